r"""The offline mini-study: all five methods on the WordNet gym's cls->cls and non-cls->cls settings,
with the small T5 pretrained here (assets/small_t5), 5 seeds x 4 learning rates per target task.

  python experiments/mini_study.py [--workdir=runs/mini_study] [--settings=wn_cls2cls,wn_nocls2cls]

Each setting is `experiments/run_setting.py --preset=mini`; the study's tables land in
<workdir>/<setting>/comparison_<setting>.{md,csv,json,png}. Resumable: run it again to continue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/mini_study", "Output directory.")
_SETTINGS = flags.DEFINE_list("settings", ["wn_cls2cls", "wn_nocls2cls"], "WordNet gym settings.")
_PRESET = flags.DEFINE_string("preset", "mini", "Config preset (mini; demo for a quick look).")

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv) -> None:
  del argv
  for setting in _SETTINGS.value:
    start = time.time()
    subprocess.run([sys.executable, os.path.join(HERE, "run_setting.py"), f"--setting={setting}",
                    f"--preset={_PRESET.value}", f"--workdir={os.path.join(_WORKDIR.value, setting)}"],
                   check=True)
    print(f"{setting}: {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
