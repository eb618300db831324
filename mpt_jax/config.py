"""The shared base of every config in configs/: the study's defaults, method defaults and presets.

A config file under configs/ is a thin `get_config(arg=None)` over `base_config(method, setting, arg)`;
`arg` picks a preset (`configs/maml_cls2cls.py:tiny`). Defaults equal the reference study's except where
docs/PROTOCOL.md lists a deviation (each says so in a comment here too); the `reference` preset
(`configs/maml_cls2cls.py:reference`) sets every such key to the reference's behaviour.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from mpt_jax import paths, resources, study


METHODS = study.METHODS  # the study's; every registered method is mpt_jax.methods.names()
SEEDS = study.SEEDS
STAGES = ("upstream", "downstream")


def base_config(method: str, setting: str, preset: str | None = None) -> ml_collections.ConfigDict:
  """The full config of `method` (any registered in mpt_jax/methods.py) on `setting`, with the named
  preset applied: each section's keys come from its builder below (`SECTIONS`), beside its check."""
  from mpt_jax import methods  # here, not above: a config file is read before JAX may start

  method_entry = methods.get(method)  # an unknown name: ValueError naming the registered ones
  c = ml_collections.ConfigDict()
  c.method = method  # the method: pt | mtl | maml | fomaml | reptile (or any in mpt_jax/methods.py)
  c.setting = setting  # one of the study's 11 settings (reference/settings.json) or an offline gym's
  _run_keys(c)
  c.prompt = _prompt_keys()
  c.data = _data_keys()
  c.upstream = _upstream_keys(method_entry.defaults)
  c.downstream = _downstream_keys()
  _apply_preset(c, preset)
  return c


# --- the sections: each one's keys (a key's comment is its meaning: `mpt-jax config`), then its check ----


def _run_keys(s: ml_collections.ConfigDict) -> None:
  """The top-level keys: data, seeds, stages, files and caches, devices, the model and its compute."""
  # A JSON file {"source": [...], "target": [...]} defines a setting of your own (overrides `setting`).
  s.setting_file = ""
  s.data_dir = ""  # CrossFit data directory (DATA_DIR/{task}/{task}_{k}_{seed}_{split}.tsv).
  # An offline gym instead of CrossFit ("synthetic" or "wordnet"); its data_dir is found or generated.
  s.gym = ""
  s.seeds = SEEDS  # the data seeds of every task (CrossFit's k-shot files {task}_{k}_{seed}_*.tsv)
  s.seed = 0  # rng of upstream sampling, dropout and prompt init.
  s.stages = ("upstream", "downstream")  # which stages run (a stage's finished work is reused)
  s.init_prompt = ""  # a saved prompt (.npy) or a PEFT adapter dir to start downstream from; skips upstream.
  # Tokenized tasks and compiled steps; default: <workdir>/cache (for a URL workdir, a directory of this
  # machine's cache named after it). Always a local path.
  s.cache_dir = ""
  # JAX's persistent compilation cache: a resumed or repeated run, and the next method of a study (which
  # share a cache_dir), load their compiled steps instead of compiling again (mpt_jax/compilation.py).
  s.compilation_cache = True
  # Where JAX's compilation cache lives. Default: $MPT_COMPILATION_CACHE_DIR (one cache for every run of
  # this machine) or <cache_dir>/compiled.
  s.compilation_cache_dir = os.environ.get("MPT_COMPILATION_CACHE_DIR", "")
  # Devices of the mesh ('data', 'model'): 0 = all. model_parallel of them form the 'model' axis, over
  # which the frozen weights are split (mpt_jax/sharding.py; 1: every device holds them all, the choice
  # while they fit); the rest of the factor is the data-parallel axis. Upstream splits each step's tasks
  # (MTL: examples) over 'data', so its size must divide upstream.tasks_per_step (MTL: batch_size).
  s.num_devices = 0
  s.model_parallel = 1  # size of the mesh's 'model' axis (see num_devices)

  s.model = "google/t5-large-lm-adapt"  # a hub id, or a checkpoint directory (local or a URL)
  # The hub revision of a hub id (a branch, tag or commit hash; a directory ignores it): every download
  # asks for it, and the commit it resolved to is recorded (run_record.json) and fingerprinted.
  s.model_revision = "main"
  # The frozen T5's weights and compute (matmuls, activations, residual stream): "float32" or "bfloat16"
  # (half the memory); layer-norm statistics, softmax, logits, loss, prompt and optimizer stay float32.
  # The reference ran MTL and downstream under fp16 autocast (docs/PROTOCOL.md, "Precision").
  s.dtype = "float32"
  s.remat_layers = False  # rematerialize each T5 layer in the backward pass.
  s.remat_policy = "nothing"  # what a rematerialized layer keeps: "nothing" | "dots" (its x @ W outputs)
  # One lax.scan over the T5 layers (params stacked): compiles one layer body instead of one per layer
  # (a T5-large step compiled for 1-2 minutes unrolled); same checkpoints, same numbers.
  s.scan_layers = False
  # Attention: our einsums, or jax.nn.dot_product_attention ("xla", or "cudnn": fused kernels on NVIDIA
  # GPUs, bfloat16, first-order gradients) where no dropout is drawn (evaluation, dropout_rate 0).
  s.attention = "einsum"
  s.dropout_rate = 0.1  # T5's dropout while training (upstream and downstream); 0: deterministic
  s.pt_results = ""  # a PT results.json to compute the relative gain against.


def _check_run(c: _Checks) -> None:
  """The top-level keys: method, data source, stages, devices, model and its compute."""
  from mpt_jax import gyms, methods
  from mpt_jax.model import hf, t5

  c.one_of("method", methods.names())
  if c["gym"]:
    c.one_of("gym", gyms.GYMS)
  elif not c["data_dir"]:
    c.note(
      "config.data_dir is empty: pass --config.data_dir=/path/to/crossfit_data (the CrossFit "
      "layout DATA_DIR/{task}/{task}_{k}_{seed}_{split}.tsv), or --config.gym=wordnet (or "
      "synthetic) for an offline gym"
    )
  c.seeds("seeds", "distinct integers >= 0 (CrossFit's data seeds: 100, 13, 21, 42, 87)", allow_empty=False)
  c.integer("seed", 0)
  stages = tuple(c["stages"])
  if not stages or any(stage not in STAGES for stage in stages):
    c.add("stages", f"one or both of {STAGES}")
  c.integer("num_devices", 0)
  c.integer("model_parallel", 1)
  revision = c["model_revision"]
  if not isinstance(revision, str) or not revision.strip() or revision != revision.strip():
    c.add("model_revision", "a hub revision: a branch, tag or commit hash (a string; default 'main')")
  model = c["model"]
  if hf.looks_local(model) and not paths.isdir(paths.absolute(model)):
    c.note(
      f"config.model={model!r}: no such checkpoint directory (or pass a hub id such as "
      f"google/t5-large-lm-adapt)"
    )
  c.one_of("dtype", t5.DTYPES)
  c.one_of("remat_policy", tuple(t5.REMAT_POLICIES))
  c.one_of("attention", t5.ATTENTION_IMPLEMENTATIONS)
  if not (_is_number(c["dropout_rate"]) and 0 <= c["dropout_rate"] < 1):
    c.add("dropout_rate", "a probability in [0, 1)")


def _prompt_keys() -> ml_collections.ConfigDict:
  """The soft prompt: its length, placement and initialization."""
  s = ml_collections.ConfigDict()
  s.length = study.PROMPT_LENGTH  # soft-prompt rows (the study's 100)
  # Deviation (docs/PROTOCOL.md): the reference appended the prompt after each batch's longest input
  # ("after_padding", reproduced exactly), so an example's prompt positions depend on the other inputs
  # of its batch; "prepend" is the prompt-tuning literature's placement, "suffix" puts the prompt right
  # after each example's own last token.
  s.placement = "prepend"
  s.init = "task_names"  # task_names (reference) | vocab | uniform | label_words | token
  s.vocab_top_k = 5000  # for init "vocab": rows drawn from the embeddings of the first k pieces
  s.label_words = ()  # for init "label_words"
  s.init_token = "</s>"  # for init "token": every row is this vocabulary piece's embedding (EOS)
  return s


def _check_prompt(c: _Checks) -> None:
  from mpt_jax import prompt as prompt_lib
  from mpt_jax.model import t5

  c.integer("prompt.length")
  c.one_of("prompt.placement", t5.PLACEMENTS)
  c.one_of("prompt.init", prompt_lib.INITS)
  c.integer("prompt.vocab_top_k")
  if c["prompt.init"] == "label_words" and not c["prompt.label_words"]:
    c.add("prompt.label_words", "label words for prompt.init='label_words'")
  if c["prompt.init"] == "token" and not (isinstance(c["prompt.init_token"], str) and c["prompt.init_token"]):
    c.add(
      "prompt.init_token", "one piece of the tokenizer's vocabulary (e.g. '</s>') for prompt.init='token'"
    )


def _data_keys() -> ml_collections.ConfigDict:
  """How examples become token ids: template, direction, lengths and length buckets."""
  s = ml_collections.ConfigDict()
  s.input_template = " [{task}] {input}"  # how an example's text is shown to T5 (the study's)
  # How classification tasks (those decoded by rank classification) are trained and scored: "direct" (the
  # study's: the model reads the input and generates the label) or "channel" (Min et al. 2022, noisy
  # channel prompting: the model reads the prompt and a label and generates the input, trained on
  # p(input | label), and each input gets the label under which it is most likely). Generation tasks stay
  # direct. Upstream uses each source task in the same form as downstream.
  s.direction = "direct"
  s.max_input_len = study.MAX_INPUT_LEN  # input tokens, EOS included; longer inputs are cut
  # Length buckets: each batch is padded to its longest input (target) rounded up to a multiple of these,
  # not to max_input_len (max_target_len): the study's inputs are mostly far shorter than 512, and a step
  # compiles once per bucket shape met (benchmarks/README.md: 1-6 per step). 0: pad to the maximum.
  # Losses do not depend on it, except with prompt.placement "after_padding", whose prompt position moves
  # with the padding (the reference cut each batch to its longest row: multiples of 1).
  s.input_bucket_multiple = 64
  s.target_bucket_multiple = 16  # the targets' bucket multiple (see input_bucket_multiple)
  return s


def _check_data(c: _Checks) -> None:
  from mpt_jax.model import loss as loss_lib

  template = c["data.input_template"]
  try:
    template.format(task="t", input="x")
    if "{input}" not in template:
      c.add("data.input_template", "a format with {input} (and optionally {task})")
  except (KeyError, IndexError, ValueError):
    c.add("data.input_template", "a format with the fields {input} and optionally {task}, nothing else")
  c.one_of("data.direction", loss_lib.DIRECTIONS)
  c.integer("data.max_input_len", 2)
  c.integer("data.input_bucket_multiple", 0)
  c.integer("data.target_bucket_multiple", 0)


def _upstream_keys(method_defaults) -> ml_collections.ConfigDict:
  """Upstream: the shared keys, then the method's own defaults (its `Method` entry)."""
  s = ml_collections.ConfigDict()
  s.num_steps = 0  # outer steps of a meta-learner (MTL: see num_epochs)
  s.tasks_per_step = 2  # episodes (source tasks) per meta-step
  s.inner_steps = 1  # SGD steps of each episode's inner loop
  s.inner_batch_size = 2  # support examples of each inner step
  s.query_size = 2  # query examples of each episode (MAML, first-order MAML)
  s.inner_lr = 3e-5  # the inner loop's SGD learning rate
  s.remat_inner = False  # rematerialize each inner step (second-order MAML on T5-large).
  s.batch_size = 4  # MTL's batch: examples of a step, pooled over the source tasks
  s.num_epochs = 0  # MTL: epochs over the union of the source tasks' train+dev of all seeds
  s.max_target_len = study.UPSTREAM_TARGET_LEN  # answer tokens of the source tasks (EOS included)
  s.optimizer = "adafactor"  # the outer (MTL: the only) optimizer: adafactor | adamw | sgd
  s.lr = 0.5  # the outer optimizer's learning rate
  s.checkpoint_every = 200  # steps between upstream checkpoints (a killed run resumes from the last)
  s.log_every = 10  # steps between log lines (JSONL, TensorBoard, progress bar)
  s.update(method_defaults)  # the method's own hyperparameters (the study's, PROTOCOL.md "Upstream")
  return s


def _check_upstream(c: _Checks) -> None:
  """The method's own keys (its Method entry says which it reads) and how its batches split over the
  data axis of the mesh."""
  from mpt_jax import methods, optim

  method = methods.REGISTRY.get(c["method"])  # an unknown one is reported by _check_run
  if method is None or not method.has_upstream:
    _data_axis_size(c.flat, c.available_devices, c.problems)
    return
  c.one_of("upstream.optimizer", optim.OPTIMIZERS)
  c.rate("upstream.lr")
  c.integer("upstream.max_target_len", 2)
  c.integer("upstream.checkpoint_every")
  c.integer("upstream.log_every")
  if method.upstream == methods.POOL:
    c.integer("upstream.batch_size")
    c.integer("upstream.num_steps", 0)
    if c["upstream.num_steps"] == 0 and not (
      _is_number(c["upstream.num_epochs"]) and c["upstream.num_epochs"] > 0
    ):
      c.add(
        "upstream.num_epochs",
        "> 0 when upstream.num_steps is 0 (MTL and any pooled method train num_steps, or epochs)",
      )
  else:
    for key in ("num_steps", "tasks_per_step", "inner_steps", "inner_batch_size"):
      c.integer("upstream." + key)
    if method.needs_query:
      c.integer("upstream.query_size")
  if "inner_lr" in method.options.values():
    c.rate("upstream.inner_lr")
  per_step_key = "upstream." + methods.LEADING_SIZE_KEY[method.upstream]
  per_step = c[per_step_key]
  data_axis = _data_axis_size(c.flat, c.available_devices, c.problems)
  if data_axis and isinstance(per_step, int) and per_step > 0 and per_step % data_axis:
    c.note(
      f"config.{per_step_key}={per_step} does not split over the {data_axis} devices of the data axis "
      f"(upstream is data parallel over it): make it a multiple of {data_axis}, or use fewer devices "
      f"with --config.num_devices (data axis = num_devices / model_parallel, a divisor of {per_step})"
    )


def _downstream_keys() -> ml_collections.ConfigDict:
  """The downstream grid: learning rates, steps, selection, scoring and decoding."""
  s = ml_collections.ConfigDict()
  s.lrs = (0.5, 0.4, 0.3, 0.2)  # the grid's learning rates: each seed trains one run per rate
  s.batch_size = 16  # train examples of a run's step
  s.num_steps = 3000  # steps of each run (capped by max_epochs)
  # Each run's cap in epochs of its train split (0: no cap). The reference's loop also ended after 1000
  # epochs (--num_train_epochs 1000): a task of 32 train examples (batch 16, 2 steps an epoch) trained
  # 2000 steps, not 3000.
  s.max_epochs = 1000
  s.eval_every = 50  # steps between dev scorings (the best-dev candidates)
  # Is the initial prompt (step 0) a candidate for the best-dev prompt? The reference's first candidate
  # came after eval_every steps; True can favour a good initialization over prompt tuning.
  s.step0_candidate = False
  # Which prompt of a seed's best-dev learning rate is tested: "best_dev" (a copy of its best-dev prompt)
  # or "last" (its prompt at the last step: what the reference tested, as its "best" was a reference to
  # the live parameter, not a copy).
  s.test_prompt = "best_dev"
  s.optimizer = "adafactor"  # the runs' optimizer (see upstream.optimizer)
  # What a classification task's prompt (one decoded by rank classification) trains on: "likelihood", the
  # token cross-entropy of its gold answer (the study's); "label_choice", the cross-entropy of the gold among
  # the task's train labels, each scored by its log-likelihood in the task's direction (data.direction), as
  # rank classification scores them; "likelihood+label_choice", their sum. Generation tasks and upstream
  # stay on the likelihood.
  s.objective = "likelihood"
  s.max_target_len = study.DOWNSTREAM_TARGET_LEN  # answer tokens of the target tasks (EOS included)
  s.eval_batch_size = 32  # examples per run in a batch of dev and test scoring
  # Memory for the grid's step and its dev decoding, in GiB: the runs go in the fewest chunks that fit
  # (same results, mpt_jax/chunking.py). 0: the device's free memory (CPUs report none: one chunk).
  s.memory_budget_gb = 0.0
  # How many of the grid's runs a step computes together (vmapped); the others follow one group after
  # another in the same step. 0: auto, one at a time on a CPU (vmapping them was ~1.6x slower there:
  # benchmarks/results/grid_small.md) and all at once on a GPU or TPU. Same results to float rounding.
  s.runs_at_once = 0
  # How dev (best-dev selection) and test are decoded: beam | greedy | rank (the most likely of the train
  # split's labels) | auto (rank for a task scored by a classification metric, greedy for the others).
  # The study's: transformers' beam search with 4 beams, repetition penalty 2.5, early stopping (an
  # example stops once it holds 4 finished hypotheses).
  s.decoding = "beam"
  # How rank classification weighs the labels' scores (decode.CALIBRATIONS): "none", as scored (the
  # study's); "train_mean", each label's score minus its mean score over the task's train inputs under the
  # same prompt, for dev and test alike (no label is read; docs/PROTOCOL.md).
  s.calibration = "none"
  s.num_beams = 4  # beam search's beams
  s.repetition_penalty = 2.5  # beam search's repetition penalty (transformers')
  # Beam search stops an example once it holds num_beams finished hypotheses. False: transformers' default
  # heuristic ("never" only through decode.py).
  s.early_stopping = True
  # Tokens a generation may produce. The study's generate(max_length=128) counts the decoder start token;
  # ours counts generated tokens.
  s.max_decode_len = 127
  s.tasks = ()  # a subset of the setting's target tasks; empty = all
  # Also prompt-tune every source task of the setting with the same grid, into <workdir>/sources/<task>/:
  # the task embeddings of mpt_jax.analysis (task similarity vs gain). Only the PT run acts on it.
  s.prompt_tune_sources = False
  s.source_seeds = ()  # the seeds of those source grids; empty: config.seeds
  return s


def _check_downstream(c: _Checks) -> None:
  from mpt_jax import adapt, algorithms, decode, optim

  d = "downstream."
  lrs = tuple(c[d + "lrs"])
  if (
    not lrs
    or len(set(lrs)) != len(lrs)
    or not all(_is_number(lr) and math.isfinite(lr) and lr > 0 for lr in lrs)
  ):
    c.add(d + "lrs", "distinct finite learning rates > 0")
  for key in ("batch_size", "num_steps", "eval_every", "eval_batch_size", "max_decode_len", "num_beams"):
    c.integer(d + key)
  c.integer(d + "max_target_len", 2)
  c.integer(d + "max_epochs", 0)
  c.integer(d + "runs_at_once", 0)
  c.one_of(d + "test_prompt", adapt.TEST_PROMPTS)
  c.one_of(d + "optimizer", optim.OPTIMIZERS)
  c.one_of(d + "objective", algorithms.OBJECTIVES)
  budget = c[d + "memory_budget_gb"]
  if not (_is_number(budget) and math.isfinite(budget) and budget >= 0):
    c.add(d + "memory_budget_gb", "a number of GiB >= 0 (0: the device's free memory)")
  c.one_of(d + "decoding", decode.DECODINGS)
  c.one_of(d + "calibration", decode.CALIBRATIONS)
  # Options that work on a task's label set, which only rank classification has.
  for key, chosen, why in (
    ("data.direction", c["data.direction"] == "channel", "the channel form scores a task's label set"),
    (
      d + "objective",
      c[d + "objective"] != "likelihood",
      "a label-choice objective trains on a task's label set",
    ),
    (
      d + "calibration",
      c[d + "calibration"] != "none",
      "calibration weighs the scores of a task's label set",
    ),
  ):
    if chosen and c[d + "decoding"] not in ("rank", "auto"):
      c.add(
        d + "decoding", f"'rank' or 'auto' with {key}={c[key]!r} ({why}; beam or greedy generation has none)"
      )
  c.rate(d + "repetition_penalty")
  c.seeds(d + "source_seeds", "distinct integers >= 0, or () for config.seeds", allow_empty=True)


# Each section of the config: its builder (where its keys are declared, with their meanings) and its
# check, defined side by side above. A key added to a section is checked in that section's function.
SECTIONS = (
  ("", _run_keys, _check_run),
  ("prompt", _prompt_keys, _check_prompt),
  ("data", _data_keys, _check_data),
  ("upstream", _upstream_keys, _check_upstream),
  ("downstream", _downstream_keys, _check_downstream),
)


def _apply_preset(c: ml_collections.ConfigDict, preset: str | None) -> None:
  if not preset:
    return
  if preset not in PRESETS:
    raise ValueError(
      f"unknown preset {preset!r}; expected one of {sorted(PRESETS)} (the offline mini-study's `mini` and "
      f"`mini_final` are experiments/presets.py's: run them through experiments/run_setting.py)"
    )
  PRESETS[preset](c)


def _pools_examples(c) -> bool:
  """Whether c.method trains upstream on pooled batches of examples (MTL), not on episodes."""
  from mpt_jax import methods

  return methods.get(c.method).upstream == methods.POOL


def _tiny(c):
  """A seconds-scale smoke run: tiny model size is set by the model path; few steps, short lengths."""
  c.seeds = (100, 13)
  c.prompt.length = 4
  c.data.max_input_len = 32
  c.upstream.num_steps = min(c.upstream.num_steps, 4) if c.upstream.num_steps else 0
  c.upstream.num_epochs = 1 if _pools_examples(c) else 0
  c.upstream.max_target_len = 8
  c.upstream.checkpoint_every = 2
  c.upstream.log_every = 1
  c.downstream.lrs = (0.5, 0.3)
  c.downstream.batch_size = 4
  c.downstream.num_steps = 4
  c.downstream.eval_every = 2
  c.downstream.max_target_len = 8
  c.downstream.max_decode_len = 8
  c.downstream.eval_batch_size = 8
  c.downstream.decoding = "greedy"  # compiles in a fraction of beam search's time


def _demo(c):
  """The embedded offline default: the small T5 pretrained here on WordNet text (mpt_jax/assets/small_t5)
  and the WordNet gym (mpt_jax/assets/wordnet_gym), with a reduced grid (2 seeds x 2 learning rates, 2 target
  tasks, short runs, prompt 16: one row per source task name plus a few) so that all five methods finish in minutes on 2 CPU cores, and rank classification over
  each task's labels (a small model's free generation is mostly not a label at all). Hyperparameters of the
  methods themselves (Adafactor lr 0.5, inner SGD lr 3e-5, 2 tasks x (2+2) for MAML, ...) stay the study's."""
  c.gym = "wordnet"
  c.model = str(resources.SMALL_T5_DIR)
  c.seeds = (100, 13)
  c.prompt.length = 16
  c.data.max_input_len = 64  # the gym's inputs: median ~40 tokens, longest ~90
  u = c.upstream
  u.num_steps = 30
  u.batch_size = 4
  u.max_target_len = 8  # the gym's labels are 1-7 tokens
  u.checkpoint_every = 15
  u.log_every = 10
  d = c.downstream
  d.tasks = ("wn-noun_category_living", "wn-antonym_pair")
  d.lrs = (0.5, 0.3)
  d.batch_size = 8
  d.num_steps = 30
  d.eval_every = 10
  d.max_target_len = 8
  d.max_decode_len = 8
  d.eval_batch_size = 40
  d.decoding = "auto"  # rank classification for classification tasks, greedy generation for the others


# The reference implementation's behaviour, key by key, wherever ours can follow it (docs/PROTOCOL.md
# lists every deviation and why; the first three differ from our defaults, the others restate them so the
# preset stays the reference's if a default changes).
REFERENCE_BEHAVIOUR = {
  # It dropped each batch's all-padding columns, then appended the prompt.
  "prompt.placement": "after_padding",
  # Its "best" prompt was a reference to the live parameter: it tested the last one.
  "downstream.test_prompt": "last",
  # Its predict_batch_size: with after_padding, which inputs share a batch sets the prompt's position.
  "downstream.eval_batch_size": 16,
  "downstream.step0_candidate": False,
  "downstream.max_epochs": 1000,
  "downstream.decoding": "beam",
  "downstream.calibration": "none",
  "downstream.num_beams": 4,
  "downstream.repetition_penalty": 2.5,
  "downstream.early_stopping": True,
  "downstream.max_decode_len": 127,
  # fp16 autocast is not available; on a GPU, float32 matmuls run in TF32 by default (fp16's 10-bit
  # mantissa, float32's range) with float32 weights and residual stream, as under autocast.
  "dtype": "float32",
}


def _reference(c):
  """The reference implementation's behaviour where ours differs (REFERENCE_BEHAVIOUR, docs/PROTOCOL.md):
  the prompt after each batch's longest input, the last prompt tested, dev decoded in batches of 16."""
  for key, value in REFERENCE_BEHAVIOUR.items():
    *path, name = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[name] = value


# A preset is a function that changes a config in place; experiments add their own with `register_preset`
# (experiments/presets.py: the offline mini-study's `mini` and `mini_final`).
PRESETS = {"tiny": _tiny, "demo": _demo, "reference": _reference}


def register_preset(name: str, apply) -> None:
  """Makes `apply(config)` the preset `name` (for `base_config(..., name)`, `:name` and --preset)."""
  if name in PRESETS and PRESETS[name] is not apply:
    raise ValueError(f"preset {name!r} exists already")
  PRESETS[name] = apply


# --- checks: every key, before anything is written or computed ------------------------------------------


class ConfigError(ValueError):
  """Every problem of a config at once, found before anything is written or computed."""

  def __init__(self, problems):
    self.problems = list(problems)
    super().__init__(
      f"{len(self.problems)} problem(s) in the config; fix them all, then rerun:\n"
      + "\n".join(f"  {p}" for p in self.problems)
    )


def flatten(config) -> dict[str, Any]:
  """{"upstream.lr": 0.5, ...}: every leaf of a (nested) config under its dotted key."""
  out = {}

  def walk(node: Mapping, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      else:
        out[prefix + key] = value

  walk(config.to_dict() if hasattr(config, "to_dict") else config, "")
  return out


# Names a user may know from the code or the paper for a config key (the config's own name wins).
_KEY_ALIASES = {
  "learning_rate": "lr",
  "learning_rates": "lrs",
  "outer_lr": "lr",
  "steps": "num_steps",
  "support_size": "inner_batch_size",
  "input_format": "input_template",
  "max_input_length": "max_input_len",
  "max_target_length": "max_target_len",
  "prompt_length": "prompt.length",
  "first_order": None,
}


def suggest_key(config, key: str) -> str:
  """' (did you mean 'upstream.lr'?)' for an unknown dotted key, or ''."""
  keys = list(flatten(config)) + [k for k, v in config.items() if isinstance(v, Mapping)]
  parent, _, leaf = key.rpartition(".")
  if leaf in _KEY_ALIASES:
    alias = _KEY_ALIASES[leaf]
    if alias is None:  # a key that became a choice of method
      return " (first-order MAML is --config.method=fomaml)"
    for candidate in (f"{parent}.{alias}" if parent else alias, alias):
      if candidate in keys:
        return f" (did you mean {candidate!r}?)"
  siblings = [k for k in keys if k.rpartition(".")[0] == parent]
  close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.6) or difflib.get_close_matches(
    key, keys, n=3, cutoff=0.6
  )
  if not close:  # the right leaf under another parent (`--config.lr` for upstream.lr)
    close = [k for k in keys if k.rpartition(".")[2] == leaf][:3]
  return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def unknown_keys(config, keys) -> list[str]:
  """'config.x: no such key (did you mean ...)' for each of `keys` (dotted) the config lacks."""
  known = set(flatten(config)) | {k for k, v in config.items() if isinstance(v, Mapping)}
  return [f"config.{key}: no such key{suggest_key(config, key)}" for key in keys if key not in known]


def _did_you_mean(value: str, options) -> str:
  close = difflib.get_close_matches(value, [str(o) for o in options], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _data_axis_size(flat: Mapping[str, Any], available_devices: int | None, problems: list) -> int:
  """The size of the mesh's data axis (0 when unknown or invalid), checking num_devices and
  model_parallel against the devices there are."""
  devices, model_parallel = flat["num_devices"], flat["model_parallel"]
  if available_devices is None or not isinstance(devices, int) or not isinstance(model_parallel, int):
    return 0
  devices = devices or available_devices
  if devices > available_devices:
    problems.append(
      f"config.num_devices={devices}: expected at most the {available_devices} device(s) there are"
    )
    return 0
  if model_parallel < 1 or devices % model_parallel:
    problems.append(
      f"config.model_parallel={model_parallel}: the {devices} device(s) do not split into groups of "
      f"{model_parallel} (the 'model' axis); use a divisor of {devices}"
    )
    return 0
  return devices // model_parallel


class _Checks:
  """The problems found in a flattened config, and the checks every section's validation uses."""

  def __init__(self, config, available_devices: int | None):
    self.config = config
    self.flat = flatten(config)
    self.available_devices = available_devices
    self.problems: list[str] = []

  def __getitem__(self, key: str):
    return self.flat[key]

  def note(self, problem: str) -> None:
    self.problems.append(problem)

  def add(self, key: str, expected: str) -> None:
    self.note(f"config.{key}={self.flat[key]!r}: expected {expected}")

  def one_of(self, key: str, options) -> None:
    value = self.flat[key]
    if value not in options:
      hint = _did_you_mean(value, options) if isinstance(value, str) else ""
      self.note(f"config.{key}={value!r}: expected one of {', '.join(map(repr, options))}{hint}")

  def integer(self, key: str, minimum: int = 1) -> None:
    value = self.flat[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      self.add(key, f"an integer >= {minimum}")

  def rate(self, key: str) -> None:
    value = self.flat[key]
    if not (_is_number(value) and math.isfinite(value) and value > 0):
      self.add(key, "a finite number > 0")

  def seeds(self, key: str, expected: str, allow_empty: bool) -> None:
    seeds = tuple(self.flat[key])
    if (
      (not seeds and not allow_empty)
      or len(set(seeds)) != len(seeds)
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
      self.add(key, expected)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_setting_and_files(c: _Checks) -> None:
  """The setting and its target tasks (resolved as the run will), and the files the config names."""
  from mpt_jax import gyms, methods

  try:
    setting = gyms.resolve_setting(c.config)
  except (ValueError, OSError) as error:
    key = "setting_file" if c["setting_file"] else "setting"
    c.note(f"config.{key}={c[key]!r}: {error}")
  else:
    known_method = c["method"] in methods.REGISTRY  # an unknown one is reported by _check_run
    if known_method and methods.trains_upstream(c.config) and not setting.source:
      where = (
        f"config.setting_file={c['setting_file']!r}" if c["setting_file"] else f"setting {setting.name!r}"
      )
      c.note(
        f"{where} has no source tasks, but config.method={c['method']!r} learns its initialization on "
        f"them: add 'source' tasks to it, or start from a given prompt with --config.init_prompt "
        f"(PT needs no sources)"
      )
    unknown = [t for t in c["downstream.tasks"] if t not in setting.target]
    if unknown:
      c.note(
        f"config.downstream.tasks: {unknown} are not target tasks of {setting.name!r} ({list(setting.target)})"
      )
  for key in ("init_prompt", "pt_results", "setting_file"):
    path = c[key]
    adapter = key == "init_prompt" and path and paths.isfile(paths.join(path, "adapter_config.json"))
    if path and not paths.isfile(path) and not adapter:  # a local path or a URL (mpt_jax/paths.py)
      c.note(f"config.{key}={path!r}: no such file")
  for key, what in (
    ("setting_file", "a small JSON file read at startup"),
    ("cache_dir", "per-machine scratch"),
  ):
    if paths.is_url(c[key]):
      c.note(f"config.{key}={c[key]!r}: must be a local path ({what}); copy it to the machine")


def validate(config, available_devices: int | None = None) -> None:
  """Raises ConfigError naming every invalid value, found by each section's check (SECTIONS) and `_check_setting_and_files`:
  enumerations, positive integers, learning rates, seeds, the setting and its target tasks, the files the
  config names, and (given the devices there are) how upstream's batches split over the devices."""
  checks = _Checks(config, available_devices)
  for _, _, check in SECTIONS:
    check(checks)
  _check_setting_and_files(checks)
  if checks.problems:
    raise ConfigError(checks.problems)
