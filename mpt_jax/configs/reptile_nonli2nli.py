"""Reptile on the `nonli2nli` setting of the study: upstream on the source tasks, then prompt tuning on its target tasks.

Run:  python -m mpt_jax.main --config=configs/reptile_nonli2nli.py --workdir=runs/reptile_nonli2nli \
        --config.data_dir=/path/to/crossfit_data [--config.model=google/t5-large-lm-adapt]
Smoke test on a tiny model:  --config=configs/reptile_nonli2nli.py:tiny --config.model=/path/to/tiny_t5
"""

from mpt_jax.config import base_config


def get_config(arg=None):
  return base_config("reptile", "nonli2nli", arg)
