r"""All five methods on one setting, then the study's comparison table: `mpt_jax/run_setting.py` (installed
as `mpt-jax study`), runnable here by path as before (launch.sh, experiments/mini_study.py).

  python experiments/run_setting.py --setting=cls2cls --workdir=runs/cls2cls \
      --set data_dir=/data/crossfit --set model=google/t5-large-lm-adapt
"""

from absl import app, flags

from mpt_jax import run_setting

if __name__ == "__main__":
  flags.mark_flags_as_required(["setting", "workdir"])
  app.run(run_setting.main)
