r"""All five methods on one setting, then the study's comparison table: `mpt_jax/run_setting.py` (installed
as `mpt-jax study`), runnable here by path as before (launch.sh, experiments/mini_study.py), with the
offline mini-study's presets (experiments/presets.py) added.

  python experiments/run_setting.py --setting=cls2cls --workdir=runs/cls2cls \
      --set data_dir=/data/crossfit --set model=google/t5-large-lm-adapt
"""

import os
import sys

from absl import app, flags

# Run by path: the repository root makes `experiments` a package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import presets  # noqa: E402
from mpt_jax import run_setting  # noqa: E402

if __name__ == "__main__":
  presets.register()  # the mini-study's presets: --preset=mini, --preset=mini_final
  flags.mark_flags_as_required(["setting", "workdir"])
  app.run(run_setting.main, flags_parser=run_setting.parse_flags)
