"""Reptile on the `both2cls` setting of the study: upstream on the source tasks, then prompt tuning on its target tasks.

Run:  python -m mpt_jax.main --config=configs/reptile_both2cls.py --workdir=runs/reptile_both2cls \
        --config.data_dir=/path/to/crossfit_data [--config.model=google/t5-large-lm-adapt]
Smoke test on a tiny model:  --config=configs/reptile_both2cls.py:tiny --config.model=/path/to/tiny_t5
"""

from mpt_jax.config import base_config


def get_config(arg=None):
  return base_config("reptile", "both2cls", arg)
