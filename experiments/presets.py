"""The offline mini-study's presets (experiments/mini_study.py, experiments/README.md): `mini`, the study's
direct form on the WordNet gym sized for 2 CPU cores, and `mini_final`, its frozen final form.

They belong to the experiment, not to the package: `register()` adds them to mpt_jax.config's presets;
experiments/run_setting.py (which mini_study.py runs per setting) calls it, so
`python experiments/run_setting.py --preset=mini ...` works as before.
"""

from __future__ import annotations

from mpt_jax import config as config_lib, methods, study


def mini(c):
  """The offline mini-study (experiments/mini_study.py): the demo's model and gym, the study's 5 seeds on
  every target task of four settings, sized to finish in 1.5-2.5 hours on 2 CPU cores (measured 2026-11-29:
  48.6 + ~41 + 23.2 + 15.9 min, PT shared between settings, experiments/README.md): 2 learning rates, 60 prompt-tuning steps (15 epochs of a 2-class 16-shot task),
  200 meta-learning steps; MTL sees as many examples as MAML (2 tasks x (2+2) x 200 = 400 batches of 4)."""
  config_lib.PRESETS["demo"](c)
  c.seeds = study.SEEDS
  u = c.upstream
  u.num_steps = 400 if methods.get(c.method).upstream == methods.POOL else 200
  u.checkpoint_every = 100
  u.log_every = 25
  d = c.downstream
  d.tasks = ()
  d.lrs = (0.5, 0.3)
  d.num_steps = 60
  d.eval_every = 20
  # PT also prompt-tunes the source tasks (2 seeds): their prompts are the task embeddings of the
  # similarity analysis (mpt_jax/analysis.py) that experiments/mini_study.py ends with.
  d.prompt_tune_sources = True
  d.source_seeds = study.SEEDS[:2]


def mini_final(c):
  """The final offline mini-study's form (issue 11), frozen before its runs with the gym, settings, seeds
  and steps of `mini`. Each change was chosen on the targets' dev files (experiments/README.md): the
  noisy-channel form with the bare input (classification tasks score p(input | label); "Direct or
  channel"), rank classification calibrated by each label's mean score over the train inputs ("Calibrated
  rank classification"), prompts that start as EOS rows, near no prompt at all, and a learning-rate grid
  reaching down to 0.03 for this model's small embeddings (RMS 0.96; "A prompt that starts near no
  prompt")."""
  mini(c)
  c.data.direction = "channel"
  c.data.input_template = "{input}"
  c.downstream.calibration = "train_mean"
  c.prompt.init = "token"
  c.downstream.lrs = (0.5, 0.3, 0.1, 0.03)


def register() -> None:
  """Makes `mini` and `mini_final` presets of mpt_jax.config (again: nothing)."""
  config_lib.register_preset("mini", mini)
  config_lib.register_preset("mini_final", mini_final)
