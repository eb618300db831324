"""Diagnostic model: the frozen model after full fine-tuning on a setting's *source* tasks.

Can prompt tuning move a frozen model that has learned to read the gym's input formats and answer with a
label word? This fine-tunes every weight of a model on the union of one setting's source tasks (their
train files, every seed: what MTL sees, but for the whole model instead of a prompt) and saves it in the
Hugging Face layout, so that `run_setting.py --methods=pt --set model=...` and `diagnose_pt.py --model=...`
can take it. The setting's target tasks are never read. Not a model for the study (its meta-learners would
start from a model already trained on their source tasks): a measurement of what prompt tuning needs.

  python experiments/tune_on_sources.py --setting=wn_cls2cls --out=runs/source_tuned/wn_cls2cls
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diagnose_pt  # noqa: E402

from mpt_jax import gyms, host_memory  # noqa: E402
from mpt_jax.data import batching, crossfit, settings as settings_lib  # noqa: E402
from mpt_jax.model import hf  # noqa: E402


def source_pool(gym_dir, setting: str, tokenizer) -> batching.TokenizedSplit:
  """The train files of every seed of the setting's source tasks (diagnose_pt registered the gym)."""
  try:
    tasks = settings_lib.get_setting(setting).source
  except settings_lib.SettingError as e:
    raise SystemExit(f"--setting: {e} (the WordNet gym's: {gyms.WORDNET_GYM_DIR}/wordnet_settings.json)")
  data = crossfit.read_crossfit(gym_dir, tasks, splits=["train"])
  return batching.concat_splits(
    [
      batching.tokenize_split(split, tokenizer, diagnose_pt.SPEC)
      for task in tasks
      for split in data[task].splits.values()
    ],
    task=f"{setting}:sources",
  )


def main(argv=None):
  host_memory.reuse_freed_memory()  # before JAX runs anything (mpt_jax/host_memory.py)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=str(diagnose_pt.REPO_ROOT / "assets" / "small_t5"))
  p.add_argument("--gym_dir", default=str(diagnose_pt.GYM_DIR))
  p.add_argument("--setting", default="wn_cls2cls")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--out", required=True, help="directory of the saved model (HF layout)")
  args = p.parse_args(argv)
  t0 = time.time()
  model, params, tokenizer = hf.load_pretrained(args.model)
  pool = source_pool(args.gym_dir, args.setting, tokenizer)
  print(f"{len(pool)} source examples of {args.setting}", flush=True)
  tuned, curve = diagnose_pt.train_all_weights(model, params, pool, args.steps, args.lr, args.batch_size)
  out = Path(args.out)
  hf.save_checkpoint(out, model.config, tuned, tokenizer)
  record = {
    "args": vars(args),
    "examples": len(pool),
    "loss_curve": curve,
    "wall_s": round(time.time() - t0, 1),
  }
  (out / "source_tuning.json").write_text(json.dumps(record, indent=1) + "\n")
  print(json.dumps(record), flush=True)
  return np.asarray(curve)


if __name__ == "__main__":
  main()
