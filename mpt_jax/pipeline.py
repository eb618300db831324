"""One method on one setting, end to end: `run(config, workdir)`, read top to bottom in sections.

1. config: every key checked (`mpt_jax.config.validate`) before anything is written or computed.
2. data: every file of the source and target tasks read and checked, all problems reported at once;
   the initial prompt's shape checked against the config and the model.
3. workdir: work made with another config is never reused or relabelled (`mpt_jax.fingerprint`).
4. runtime: what the stages compute with, built once (`build_runtime`): the model and its frozen
   weights placed on the mesh, the tokenizer, the compiled upstream and grid steps, the decoders.
5. upstream: learn the prompt initialization on the source tasks (`train.train_prompt`).
6. downstream: the study's grid on every target task (`adapt.adapt_task`), results per task.
7. results: the setting's table, with the relative gain over PT when a PT results file is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from mpt_jax import (
  adapt,
  algorithms,
  baselines,
  compilation,
  config as config_lib,
  fingerprint,
  gyms,
  lease,
  methods,
  metrics,
  optim,
  parallel,
  paths,
  peft_export,
  prompt as prompt_lib,
  results,
  scoring,
  sharding,
  throughput,
  train,
)
from mpt_jax.data import batching, crossfit, settings as settings_lib
from mpt_jax.model import dropout, hf


def run(config, workdir: str) -> dict | None:
  """`_run`, holding the workdir's lease (mpt_jax/lease.py: one job per workdir) from its first write on."""
  try:
    return _run(config, workdir)
  finally:
    lease.release(workdir)
    throughput.end_run()


def _run(config, workdir: str) -> dict | None:
  """Upstream (if the method has one), then the downstream grid on every target task, then the setting's
  results; returns the setting summary (None when the downstream stage is not run). Resumable: the same
  command continues where it stopped; a different config in the same workdir is refused."""
  # --- 1. config -------------------------------------------------------------------------------------------
  config_lib.validate(config, available_devices=jax.device_count())
  do_upstream, do_downstream = needed_stages(config)
  setting = gyms.resolve_setting(config)
  targets = list(config.downstream.tasks) or list(setting.target)
  d_model = hf.read_config(model_dir(config))["d_model"]  # a hub id out of reach fails here, before the data

  # --- 2. data and the initial prompt ----------------------------------------------------------------------
  data = read_data(
    config,
    resolve_data_dir(config, workdir),
    setting,
    targets,
    upstream=do_upstream,
    downstream=do_downstream,
  )
  init_prompt = initial_prompt_file(config, workdir, d_model, upstream=do_upstream, downstream=do_downstream)

  # --- 3. workdir: refuse to mix work of another config -----------------------------------------------------
  upstream_check = check_workdir(config, workdir, data, init_prompt, upstream=do_upstream)
  # One job per workdir: the primary takes the lease; refused while another job holds it, on every process.
  parallel.primary_says(lambda: lease.take(workdir), refusals=(lease.WorkdirBusy,))
  parallel.sync("workdir checked")  # every process has read the workdir before the primary writes to it
  if parallel.is_primary():
    paths.makedirs(workdir)
    results.run_record(config, workdir, model=model_record(config))

  # --- 4. runtime: model, weights on the mesh, tokenizer, compiled steps ---------------------------------
  runtime = build_runtime(config, workdir, upstream=do_upstream)
  logging.info(
    "setting %s: %d source, %d target tasks; data %s; devices %s",
    setting.name,
    len(setting.source),
    len(targets),
    data.data_dir,
    parallel.describe(runtime.mesh),
  )

  throughput.plan_run(planned_stages(config, data, upstream=do_upstream, downstream=do_downstream))

  # --- 5. upstream -----------------------------------------------------------------------------------------
  if do_upstream:
    init_prompt = run_upstream(runtime, data.source, upstream_check)
    throughput.skip_stage("upstream")  # if it was done already
  if not do_downstream:
    return None

  # --- 6. downstream ---------------------------------------------------------------------------------------
  summaries = run_downstream(runtime, data.target, init_prompt)
  if data.source_runs:
    logging.info(
      "prompt-tuning the %d source tasks too (config.downstream.prompt_tune_sources)", len(data.source_runs)
    )
    run_downstream(
      runtime, data.source_runs, init_prompt, out_subdir="sources", seeds=source_run_seeds(config)
    )

  # --- 7. results ------------------------------------------------------------------------------------------
  summary = results.summarize_setting(
    summaries, setting=setting.name, method=config.method, pt=config.pt_results or None
  )
  if parallel.is_primary():
    results.write_setting_results(summary, workdir)
  logging.info("results: %s", paths.join(workdir, "results.md"))
  return summary


# --- 1. config ---------------------------------------------------------------------------------------------


def has_upstream(config) -> bool:
  """Whether the config's method learns a prompt initialization upstream (mpt_jax/methods.py)."""
  return methods.get(config.method).has_upstream


def needed_stages(config) -> tuple[bool, bool]:
  """(upstream, downstream): upstream only for a method that has one and no given initial prompt."""
  return methods.trains_upstream(config), "downstream" in config.stages


def planned_stages(config, data: RunData, *, upstream: bool, downstream: bool) -> list[tuple[str, int]]:
  """The stages this run may train, for its ETA (mpt_jax/throughput.py): upstream (its steps are known
  when it starts, first), then every target task's grid (and source run's) at its longest step budget."""
  d = config.downstream
  stages = [("upstream", 0)] if upstream else []
  if downstream:
    for tasks, seeds in ((data.target, config.seeds), (data.source_runs, source_run_seeds(config))):
      for task, task_data in tasks.items():
        budgets = [
          adapt.step_budget(d.num_steps, d.max_epochs, len(task_data.split(s, "train")), d.batch_size)
          for s in seeds
        ]
        stages.append((f"downstream/{task}", max(budgets)))
  return stages


def source_run_seeds(config) -> tuple[int, ...]:
  """The seeds of the source tasks' PT grids (`downstream.source_seeds`, else the study's seeds)."""
  return tuple(config.downstream.source_seeds or config.seeds)


def prompt_tunes_sources(config) -> bool:
  """PT runs the downstream grid on the source tasks too (task embeddings for mpt_jax.analysis); the
  other methods leave that to PT (a study sets the switch for every method at once)."""
  return (
    bool(config.downstream.prompt_tune_sources)
    and methods.get(config.method).prompt_tunes_sources
    and "downstream" in config.stages
  )


# --- 2. data and the initial prompt ------------------------------------------------------------------------


def resolve_data_dir(config, workdir: str) -> str:
  """The config's data_dir, or the offline gym's directory (generated on first use)."""
  if config.data_dir:
    return config.data_dir
  if config.gym:
    # Beside the workdir; a URL workdir's gym goes to this machine's cache (it is regenerated, not read).
    gym_dir = (
      paths.join(paths.cache_root(), "gym_data")
      if paths.is_url(workdir)
      else os.path.join(workdir, os.pardir, "gym_data")
    )
    if parallel.is_primary():  # generated on first use, by one process
      gyms.data_dir(config.gym, gym_dir)
    parallel.sync("gym data")
    return gyms.data_dir(config.gym, gym_dir)
  raise config_lib.ConfigError(
    [
      "config.data_dir is empty: pass --config.data_dir=/path/to/crossfit_data (the CrossFit layout "
      "DATA_DIR/{task}/{task}_{k}_{seed}_{split}.tsv), or --config.gym=synthetic for the offline gym"
    ]
  )


@dataclasses.dataclass(frozen=True)
class RunData:
  """The checked files of every task the stages need ({task: crossfit.TaskData})."""

  data_dir: str
  source: dict  # upstream's source tasks (train, dev)
  target: dict  # the target tasks (train, dev, test)
  source_runs: dict  # the source tasks prompt-tuned downstream (`prompt_tunes_sources`)


def read_data(
  config, data_dir: str, setting, targets: Sequence[str], *, upstream: bool, downstream: bool
) -> RunData:
  """Every file the stages need, read and checked; one CrossFitError lists every problem of every task,
  source and target alike. Lines without an answer are dropped from source tasks and kept (scored 0) in
  target tasks' dev and test files, as the reference read them."""
  requests = {
    "source": (setting.source if upstream else (), config.seeds, ("train", "dev"), ()),
    "target": (targets if downstream else (), config.seeds, ("train", "dev", "test"), ("dev", "test")),
    "source_runs": (
      setting.source if prompt_tunes_sources(config) else (),
      source_run_seeds(config),
      ("train", "dev", "test"),
      (),
    ),
  }
  read, problems = {}, []
  for name, (tasks, seeds, splits, keep_empty) in requests.items():
    tasks = list(dict.fromkeys(tasks))
    read[name], found = (
      crossfit.validate_crossfit(data_dir, tasks, seeds, splits, None, keep_empty) if tasks else ({}, [])
    )
    problems += [p for p in found if p not in problems]
  problems += [crossfit.Problem(path, None, message) for path, message in unscorable_files(read["target"])]
  problems += [crossfit.Problem(path, None, message) for path, message in channel_unfit_files(config, read)]
  if problems:
    raise crossfit.CrossFitError(problems)
  return RunData(data_dir=data_dir, **read)


def read_tasks(
  data_dir: str,
  tasks: Sequence[str],
  seeds: Sequence[int],
  splits: Sequence[str],
  keep_empty_answers: Sequence[str] = (),
):
  """The tasks' files, checked. Lines without an answer are dropped except in `keep_empty_answers`: the
  reference dropped them upstream and kept them in the target tasks' dev and test files (scored 0)."""
  if not tasks:
    return {}
  return crossfit.read_crossfit(
    data_dir, list(dict.fromkeys(tasks)), seeds, splits, keep_empty_answers=keep_empty_answers
  )


def unscorable_files(target_data) -> list[tuple[str, str]]:
  """(path, why) of target files with lines without an answer under a metric of the first gold
  (Classification-F1, Matthew- and Pearson-Correlation), which cannot score them (the reference's scorer
  failed on them too)."""
  found = []
  for task, data in target_data.items():
    metric = settings_lib.metric_for_task(task)
    if metric not in metrics.FIRST_GOLD_METRICS:
      continue
    for split in data.splits.values():
      count = sum(not golds for golds in split.answers)
      if count:
        found.append(
          (
            split.path,
            f"{count} line(s) without an answer, which {metric} (a metric of the "
            f"first gold) cannot score; give them an answer or remove them",
          )
        )
  return found


def channel_unfit_files(config, read: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
  """(path, why) of the files that a channel task trains on (config.data.direction "channel": upstream the
  sources' train and dev files, downstream the train files) with a line of several answers: the channel
  form conditions on one label per line (`batching.channel_form`)."""
  found = []
  for name, data in read.items():
    trained = ("train", "dev") if name == "source" else ("train",)
    for task, task_data in data.items():
      if scoring.task_direction(config, task) != "channel":
        continue
      for (_, split_name), split in sorted(task_data.splits.items()):
        count = sum(len(golds) > 1 for golds in split.answers)
        if split_name in trained and count:
          found.append(
            (
              split.path,
              f"{count} line(s) with several answers, but config.data.direction='channel' trains "
              f"{task} on p(input given its one label); give each line one answer or use the direct form",
            )
          )
  return found


def check_scorable(target_data) -> None:
  """Raises when a target file has lines its metric cannot score (see `unscorable_files`)."""
  found = unscorable_files(target_data)
  if found:
    raise crossfit.CrossFitError([crossfit.Problem(path, None, why) for path, why in found])


def initial_prompt_file(
  config, workdir: str, d_model: int, *, upstream: bool, downstream: bool
) -> np.ndarray | None:
  """The prompt downstream starts from when it is a file: `config.init_prompt`, or (downstream alone, for
  a method with an upstream stage) the upstream prompt of this workdir; shape-checked [prompt.length,
  d_model]. None when upstream makes it now, or for PT (each task starts from its own name)."""
  if config.init_prompt:
    path, key = config.init_prompt, "config.init_prompt"
  elif downstream and not upstream and has_upstream(config):
    path, key = paths.join(workdir, "upstream", "prompt.npy"), "the upstream prompt"
    if not paths.exists(path):
      raise FileNotFoundError(
        f"{config.method} downstream needs an upstream prompt: none at {path}; run "
        f"the upstream stage first or pass --config.init_prompt=path.npy"
      )
  else:
    return None
  prompt, _ = peft_export.load_any_prompt(path, d_model=d_model)  # a .npy or a PEFT adapter directory
  if prompt.shape[0] != config.prompt.length:
    raise ValueError(
      f"{key} {path} has {prompt.shape[0]} rows but config.prompt.length is "
      f"{config.prompt.length}: pass --config.prompt.length={prompt.shape[0]} to use it, or a "
      f"prompt of {config.prompt.length} rows"
    )
  return prompt


# --- 3. workdir --------------------------------------------------------------------------------------------


def model_dir(config):
  """config.model's checkpoint directory (a hub id: its snapshot of config.model_revision, resolved once a
  run); raises hf.CheckpointNotFound."""
  return hf.resolve_checkpoint(config.model, config.model_revision)


def model_record(config) -> dict[str, Any]:
  """What run_record.json says of the model: the id or path, the revision asked for, the directory it
  resolved to and its hub commit (None: a directory, not a hub snapshot)."""
  path = model_dir(config)
  return {
    "model": config.model,
    "revision": config.model_revision,
    "path": str(path),
    "commit": hf.snapshot_commit(path),
  }


def dropout_masks(config) -> dict[str, Any]:
  """Which masks the stage's dropout draws (with dropout on: without it no mask is drawn, and a stage made
  before the entry existed stays reusable under any later masks)."""
  return {fingerprint.DROPOUT_MASKS: dropout.MASKS} if config.dropout_rate > 0 else {}


def upstream_fingerprint(config, source_data) -> dict[str, Any]:
  return {
    **fingerprint.stage_keys(config, "upstream"),
    fingerprint.DATA: fingerprint.data_digest(source_data),
    fingerprint.RANDOM_BITS: fingerprint.random_bits(),
    **dropout_masks(config),
    fingerprint.MODEL_SNAPSHOT: hf.snapshot_commit(model_dir(config)),
  }


# Keys that act on rank classification only: a task decoded otherwise (a generation task under "auto")
# leaves them out of its fingerprint, so its finished grid stays reusable whatever their values.
# (data.direction and downstream.objective act there only too, but were keyed for every task before this
# existed; earlier records keep them.)
RANK_ONLY_KEYS = ("downstream.calibration",)


def task_fingerprint(config, task: str, task_data, init_prompt: np.ndarray | None) -> dict[str, Any]:
  keys = fingerprint.stage_keys(config, "downstream")
  if scoring.resolve_decoding(config.downstream.decoding, task) != "rank":
    keys = {k: v for k, v in keys.items() if k not in RANK_ONLY_KEYS}
  return {
    **keys,
    fingerprint.DATA: fingerprint.data_digest({task: task_data}),
    fingerprint.INITIAL_PROMPT: None if init_prompt is None else fingerprint.digest(init_prompt),
    fingerprint.RANDOM_BITS: fingerprint.random_bits(),
    **dropout_masks(config),
    fingerprint.MODEL_SNAPSHOT: hf.snapshot_commit(model_dir(config)),
  }


def _fresh_workdir_fix(workdir: str, upstream_prompt: bool) -> str:
  reuse = (
    (
      f" (to keep its upstream prompt, start downstream from it there: --config.init_prompt="
      f"{paths.join(workdir, 'upstream', 'prompt.npy')})"
    )
    if upstream_prompt
    else ""
  )
  return f"Use a fresh --workdir{reuse}"


def check_workdir(
  config, workdir: str, data: RunData, init_prompt: np.ndarray | None, *, upstream: bool
) -> fingerprint.Check | None:
  """Compares every stage directory of the workdir with this config's fingerprints before any compute;
  raises one WorkdirConflict naming every difference. Returns upstream's check (its record, and the new
  learning rates it accepts after a divergence).

  The upstream stage is compared whenever downstream starts from this workdir's upstream prompt, run now
  or not (a downstream-only rerun with other upstream keys would label the old prompt's results with
  them); without the source data read, their hash is not compared."""
  problems, upstream_check = [], None
  upstream_prompt = paths.exists(paths.join(workdir, "upstream", "prompt.npy"))
  fix = _fresh_workdir_fix(workdir, upstream_prompt)
  if has_upstream(config) and not config.init_prompt:
    upstream_check = fingerprint.check_stage(
      paths.join(workdir, "upstream"),
      upstream_fingerprint(config, data.source),
      what=paths.join(workdir, "upstream"),
      fix=fix,
      unknown=() if upstream else (fingerprint.DATA,),
    )
    problems.append(upstream_check.problem)
  # The upstream prompt is known here unless upstream is still to make it; then it is compared when the
  # downstream stage starts.
  known_prompt = init_prompt is not None or not has_upstream(config)
  for subdir, tasks in (("downstream", data.target), ("sources", data.source_runs)):
    for task, task_data in tasks.items():
      task_dir = paths.join(workdir, subdir, task)
      check = fingerprint.check_stage(
        task_dir,
        task_fingerprint(config, task, task_data, init_prompt),
        what=task_dir,
        fix=fix,
        unknown=() if known_prompt else (fingerprint.INITIAL_PROMPT,),
      )
      problems.append(check.problem)
  problems = [p for p in problems if p]
  if problems:
    raise fingerprint.WorkdirConflict("\n".join(problems))
  return upstream_check


# --- 4. runtime --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What the stages of one run compute with, built once by `build_runtime` and passed to them."""

  config: Any
  workdir: str
  cache_dir: str  # tokenized tasks, compiled steps
  model: Any  # mpt_jax.model.t5.T5
  frozen_params: Any  # placed on the mesh once, for every stage (split over its 'model' axis)
  tokenizer: Any
  mesh: Any  # ('data', 'model')
  upstream_optimizer: Any  # None without an upstream stage
  upstream_step: Callable | None  # jitted (sharded over the mesh's devices when there are several)
  grid_optimizer: Any  # the learning rates are state: one optimizer for every run
  grid_step: Callable  # jitted; runs split over the devices
  generate: Callable | None  # greedy or beam decoding of [R] prompts, jitted (None: rank only)
  scorings: Mapping[str, scoring.DirectionScoring]  # direction -> rank, label scores, label-choice step

  def task_scoring(self, train_split: batching.TokenizedSplit) -> scoring.TaskScoring:
    """How `train_split`'s task is trained, decoded and calibrated (mpt_jax/scoring.py), resolved once."""
    return scoring.task_scoring(
      self.config,
      train_split,
      scorings=self.scorings,
      grid_step=self.grid_step,
      generate=self.generate,
      on_runs=self._on_runs,
    )

  def _on_runs(self, fn: Callable, prompts, batch, *per_run):
    """fn(frozen, prompts, input_ids, input_mask, *per_run) over R runs split across the devices (arrays
    with a leading run axis; a None passes through), the result back on the host."""
    layout = parallel.RunLayout(self.mesh, batch["input_ids"].shape[0])
    placed = layout.put((parallel.to_host(prompts), batch["input_ids"], batch["input_mask"]))
    extra = [None if x is None else layout.put(x) for x in per_run]
    return layout.to_host(fn(self.frozen_params, *placed, *extra))


def default_cache_dir(workdir: str) -> str:
  """The tokenized-task cache: <workdir>/cache, or for a URL workdir a directory of this machine's
  cache named after it (the cache is scratch that each machine rebuilds, written with the OS)."""
  if not paths.is_url(workdir):
    return paths.join(workdir, "cache")
  return paths.join(paths.cache_root(), "tokenized", hashlib.sha256(workdir.encode()).hexdigest()[:16])


def load_model(config):
  """(model, frozen_params, tokenizer) of config.model in config.dtype, with the config's dropout."""
  model, frozen_params, tokenizer = hf.load_pretrained(
    config.model,
    dtype=config.dtype,
    revision=config.model_revision,
    remat=config.remat_layers,
    scan_layers=config.scan_layers,
    on_host=True,
  )
  model = type(model)(
    dataclasses.replace(
      model.config,
      dropout_rate=config.dropout_rate,
      remat_policy=config.remat_policy,
      attention=config.attention,
    )
  )
  return model, frozen_params, tokenizer


def memory_budget_bytes(config) -> int | None:
  """The downstream's memory budget: configured, or None for the device's free memory."""
  budget = config.downstream.memory_budget_gb
  return int(budget * 2**30) if budget else None


def build_runtime(config, workdir: str, *, upstream: bool) -> Runtime:
  """The model and its weights on the mesh, the tokenizer, the compiled steps and decoders (compiled at
  their first call, once per shape)."""
  u, d = config.upstream, config.downstream
  cache_dir = config.cache_dir or default_cache_dir(workdir)  # always local (config.validate)
  if config.compilation_cache:  # before anything compiles: JAX opens its cache at the first compilation
    logging.info(
      "persistent compilation cache: %s",
      compilation.enable_persistent_cache(
        config.compilation_cache_dir or os.path.join(cache_dir, "compiled")
      ),
    )
  model, frozen_params, tokenizer = load_model(config)
  batching.check_special_ids(model)
  if config.prompt.init == "token":  # refused here, before any compute, not when the first prompt is made
    prompt_lib.vocabulary_id(tokenizer, config.prompt.init_token)
  mesh = parallel.make_mesh(num_devices=config.num_devices, model_parallel=config.model_parallel)
  logging.info("%s", sharding.describe(frozen_params, config.model_parallel, model.partition_rules))
  # From host memory, each device its part.
  frozen_params = parallel.place_frozen(frozen_params, mesh, model.partition_rules)
  loss_fn = algorithms.make_loss_fn(
    model, deterministic=config.dropout_rate == 0, placement=config.prompt.placement
  )
  upstream_optimizer = upstream_step = None
  if upstream:
    upstream_optimizer = optim.make_optimizer(u.optimizer, u.lr)
    kwargs = methods.get(config.method).step_options(u)
    if mesh.size > 1:  # config.validate checked that the step's tasks (MTL: examples) split over them
      upstream_step = parallel.make_sharded_step(config.method, loss_fn, upstream_optimizer, mesh, **kwargs)
    else:
      upstream_step = algorithms.jit_step(
        methods.make_step(config.method, loss_fn, upstream_optimizer, **kwargs)
      )
  grid_optimizer = optim.make_optimizer(d.optimizer, 1.0)
  budget = memory_budget_bytes(config)
  generate = None
  if d.decoding in ("greedy", "beam", "auto"):
    generate = scoring.make_generate(
      model,
      "greedy" if d.decoding == "auto" else d.decoding,
      max_decode_len=d.max_decode_len,
      placement=config.prompt.placement,
      num_beams=d.num_beams,
      repetition_penalty=float(d.repetition_penalty),
      early_stopping=bool(d.early_stopping),
    )
    generate = scoring.runs_in_chunks(generate, (None, 0, 0, 0), mesh, budget, "dev decoding")

  return Runtime(
    config=config,
    workdir=workdir,
    cache_dir=cache_dir,
    model=model,
    frozen_params=frozen_params,
    tokenizer=tokenizer,
    mesh=mesh,
    upstream_optimizer=upstream_optimizer,
    upstream_step=upstream_step,
    grid_optimizer=grid_optimizer,
    grid_step=adapt.make_grid_trainer(
      loss_fn, grid_optimizer, mesh, budget, algorithms.grid_runs_at_once(config.downstream.runs_at_once)
    ),
    generate=generate,
    scorings=scoring.build_scorings(config, model, mesh, grid_optimizer, budget),
  )


# --- 5. upstream -------------------------------------------------------------------------------------------


def length_buckets(config) -> batching.LengthBuckets:
  return batching.LengthBuckets(config.data.input_bucket_multiple, config.data.target_bucket_multiple)


def upstream_sampler(config, source_data, tokenizer, cache_dir):
  """(sample_batch(step, rows=None), num_steps) of the method: MTL pools batches, meta-learners draw
  episodes; `rows` of the leading axis (`upstream_batch_size`) build a process's share of a batch."""
  u = config.upstream
  spec = batching.TextSpec(
    max_input_len=config.data.max_input_len,
    max_target_len=u.max_target_len,
    input_template=config.data.input_template,
  )
  tokenized = {
    key: scoring.training_form(config, split)
    for key, split in batching.tokenize_tasks(source_data, tokenizer, spec, cache_dir).items()
  }
  # Channel and direct sources side by side (data.direction "channel" with generation sources) share a
  # shape: each side padded to the longer (length buckets cut every batch to its own longest row again).
  input_len, target_len = (max(s.lengths[i] for s in tokenized.values()) for i in (0, 1))
  tokenized = {
    key: s if s.lengths == (input_len, target_len) else batching.pad_lengths(s, input_len, target_len)
    for key, s in tokenized.items()
  }
  method = methods.get(config.method)
  if method.upstream == methods.POOL:
    pool = batching.concat_splits([tokenized[key] for key in sorted(tokenized)], "source pool")
    sampler = batching.EpochSampler(
      pool, batch_size=u.batch_size, seed=config.seed, buckets=length_buckets(config)
    )
    return sampler, u.num_steps or sampler.steps_for_epochs(u.num_epochs)
  with_query = method.needs_query
  tasks = batching.meta_tasks(tokenized, list(source_data), config.seeds, with_query=with_query)
  sampler = batching.EpisodeSampler(
    tasks,
    tasks_per_step=u.tasks_per_step,
    inner_steps=u.inner_steps,
    inner_batch_size=u.inner_batch_size,
    query_size=u.query_size if with_query else None,
    seed=config.seed,
    buckets=length_buckets(config),
  )
  return sampler, u.num_steps


def upstream_batch_size(config) -> int:
  """The leading size of an upstream batch, split over the devices: a pool's examples, or an episode's tasks."""
  return config.upstream[methods.LEADING_SIZE_KEY[methods.get(config.method).upstream]]


def initial_prompt(
  config, frozen_params, tokenizer, task_names: Sequence[str], seed: int, model=None
) -> np.ndarray:
  """The configured prompt init: task names (the study's), sampled vocabulary, uniform, label words or one
  repeated token, from `model`'s token embedding (default: T5's).
  Every process computes it (the embedding is gathered to each host)."""
  p = config.prompt
  embedding = parallel.to_host(prompt_lib.token_embedding(frozen_params, model))
  if p.init == "task_names" and len(task_names) > p.length:
    logging.info(
      "prompt init: %d task names for %d prompt rows: the first %d fill it (as the reference)",
      len(task_names),
      p.length,
      p.length,
    )
  return prompt_lib.configured_prompt(p, embedding, tokenizer, task_names, seed)


def _learning_rates(keys: Mapping[str, Any]) -> dict[str, Any]:
  return {key: keys[key] for key in fingerprint.UPSTREAM_LEARNING_RATES if key in keys}


class UpstreamDiverged(FloatingPointError):
  """Upstream stopped at a step that failed the guard; the workdir keeps what a lower rate resumes from."""


def run_upstream(runtime: Runtime, source_data, check: fingerprint.Check) -> np.ndarray:
  """The upstream prompt: reused when this workdir finished it with this config, else trained (resumed from
  the latest checkpoint). After a divergence, a rerun with lower learning rates continues from the last good
  checkpoint with them."""
  config, u = runtime.config, runtime.config.upstream
  out_dir = paths.join(runtime.workdir, "upstream")
  prompt_path = paths.join(out_dir, "prompt.npy")
  keys = upstream_fingerprint(config, source_data)
  record = check.record
  if record is not None and check.new_learning_rates is None and paths.exists(prompt_path):
    logging.info("upstream: done with this config (%s), reusing its prompt", prompt_path)
    return prompt_lib.load_prompt(prompt_path)[0]
  if record is None:
    record = fingerprint.Record(keys=keys, learning_rates=[{"step": 0, **_learning_rates(keys)}])
  elif check.new_learning_rates is not None:
    resume_step = record.divergences[-1]["resume_step"]
    logging.info(
      "upstream: continuing from step %d (the last good checkpoint) with %s after the divergence at step %d",
      resume_step,
      check.new_learning_rates,
      record.divergences[-1]["step"],
    )
    record.keys, record.diverged = keys, False
    record.learning_rates.append({"step": resume_step, **_learning_rates(keys)})
  if parallel.is_primary():
    record.save(out_dir)

  sampler, num_steps = upstream_sampler(config, source_data, runtime.tokenizer, runtime.cache_dir)
  # Each process builds and sends only its devices' share of each batch.
  sample_batch = parallel.fed_by_process(sampler, upstream_batch_size(config), runtime.mesh)
  prompt0 = initial_prompt(
    config, runtime.frozen_params, runtime.tokenizer, list(source_data), config.seed, runtime.model
  )
  logging.info("upstream: %s on %d source tasks, %d steps", config.method, len(source_data), num_steps)
  state = parallel.replicate(algorithms.init_state(prompt0, runtime.upstream_optimizer), runtime.mesh)
  loop = train.LoopConfig(
    num_steps=num_steps,
    checkpoint_every=u.checkpoint_every,
    log_every=u.log_every,
    seed=config.seed,
    learning_rate=u.lr,
  )
  try:
    state = train.train_prompt(
      runtime.upstream_step,
      state,
      runtime.frozen_params,
      sample_batch,
      loop,
      out_dir,
      checkpoint_meta={"config_fingerprint": record.hash},
    )
  except algorithms.Diverged as diverged:
    rates = _learning_rates(keys)
    record.diverged = True
    record.divergences.append(
      {
        "step": diverged.step,
        "reason": diverged.reason,
        "resume_step": diverged.resume_step,
        "learning_rates": rates,
      }
    )
    if parallel.is_primary():
      record.save(out_dir)
    resume = (
      f"it continues from step {diverged.resume_step}, the last good checkpoint, with the new rate "
      f"({paths.join(out_dir, fingerprint.FILE)} records which rate trained which steps)"
      if diverged.resume_step
      else "it starts again from the initial prompt (no step before the divergence was checkpointed)"
    )
    raise UpstreamDiverged(
      f"upstream diverged at step {diverged.step}: {diverged.reason}. The update was not applied, and "
      f"every checkpoint holds steps that passed the guard. Rerun with a lower --config.upstream.lr (now "
      f"{u.lr:g}): {resume}."
    ) from diverged
  prompt = parallel.to_host(state.prompt)
  if parallel.is_primary():
    prompt_lib.save_prompt(
      prompt_path,
      prompt,
      prompt_meta(
        runtime,
        source_tasks=list(source_data),
        steps=num_steps,
        config_fingerprint=record.hash,
        learning_rates=record.learning_rates,
      ),
    )
  logging.info("upstream prompt saved to %s", prompt_path)
  return prompt


def prompt_meta(runtime: Runtime, **extra) -> dict[str, Any]:
  config = runtime.config
  return {
    "model": config.model,
    "d_model": runtime.model.config.d_model,
    "length": config.prompt.length,
    "placement": config.prompt.placement,
    "method": config.method,
    "setting": config.setting,
    **extra,
  }


# --- 6. downstream -----------------------------------------------------------------------------------------


def grid_config(config) -> adapt.GridConfig:
  d = config.downstream
  return adapt.GridConfig(
    lrs=tuple(d.lrs),
    batch_size=d.batch_size,
    num_steps=d.num_steps,
    eval_every=d.eval_every,
    eval_batch_size=d.eval_batch_size,
    optimizer=d.optimizer,
    seed=config.seed,
    length_buckets=length_buckets(config),
    max_epochs=d.max_epochs,
    step0_candidate=d.step0_candidate,
    test_prompt=d.test_prompt,
  )


def run_downstream(
  runtime: Runtime,
  target_data,
  init_prompt: np.ndarray | None,
  out_subdir: str = results.DOWNSTREAM_DIR,
  seeds: Sequence[int] | None = None,
) -> list[dict]:
  """The grid on every task of `target_data` from `init_prompt` (None: PT, each seed from the task's own
  name); a task whose results exist with this config is reused, one whose grid was interrupted resumes."""
  config, d = runtime.config, runtime.config.downstream
  seeds = tuple(config.seeds if seeds is None else seeds)
  spec = batching.TextSpec(
    max_input_len=config.data.max_input_len,
    max_target_len=d.max_target_len,
    input_template=config.data.input_template,
  )
  grid = grid_config(config)
  fix = _fresh_workdir_fix(runtime.workdir, has_upstream(config))
  summaries = []
  for task, data in target_data.items():
    task_dir = paths.join(runtime.workdir, out_subdir, task)
    keys = task_fingerprint(config, task, data, init_prompt)
    check = fingerprint.check_stage(task_dir, keys, what=task_dir, fix=fix)
    if check.problem:
      raise fingerprint.WorkdirConflict(check.problem)
    done = paths.join(task_dir, results.RESULTS_FILE)
    if check.record is not None and paths.exists(done):
      logging.info("downstream %s: done with this config (%s), reusing it", task, done)
      throughput.skip_stage(f"downstream/{task}")
      if parallel.is_primary():  # left behind when a run stopped between results and cleanup
        adapt.remove_checkpoints(task_dir)
      summaries.append(results.load_results(done))
      continue
    record = check.record or fingerprint.Record(keys=keys)
    if parallel.is_primary():
      record.save(task_dir)
    tokenized = {
      key[1:]: split
      for key, split in batching.tokenize_tasks(
        {task: data}, runtime.tokenizer, spec, runtime.cache_dir
      ).items()
    }
    if init_prompt is None:  # PT: each seed starts from the target task's own name
      prompts = {
        s: initial_prompt(
          config, runtime.frozen_params, runtime.tokenizer, [task], config.seed + s, runtime.model
        )
        for s in seeds
      }
    else:
      prompts = {s: init_prompt for s in seeds}
    task_scoring = runtime.task_scoring(tokenized[(seeds[0], "train")])  # the labels, from the direct form
    runs = adapt.adapt_task(
      task,
      init_prompts=prompts,
      frozen_params=runtime.frozen_params,
      # Trained on the training form; dev and test stay direct (the channel scorer reads their inputs).
      tokenized={k: scoring.training_form(config, v) if k[1] == "train" else v for k, v in tokenized.items()},
      grid_step=task_scoring.grid_step,
      optimizer=runtime.grid_optimizer,
      predict=task_scoring.predict_scored,
      labels=None if task_scoring.candidates is None else task_scoring.candidates.texts,
      tokenizer=runtime.tokenizer,
      config=grid,
      seeds=seeds,
      out_dir=task_dir,
      prompt_meta=prompt_meta(runtime, config_fingerprint=record.hash),
      mesh=runtime.mesh,
      label_set=task_scoring.label_set,
      # The "train_mean" calibration averages each seed's train inputs, as the scorer reads them (direct).
      calibration=None
      if task_scoring.calibration_scores is None
      else (task_scoring.calibration_scores, {s: tokenized[(s, "train")] for s in seeds}),
    )
    summary = {**results.summarize_task(task, runs), "config_fingerprint": record.hash}
    parallel.sync(f"grid of {task} done")  # every process is done with its checkpoints
    if parallel.is_primary():
      results.write_task_results(summary, task_dir)
      adapt.remove_checkpoints(task_dir)
    summaries.append(summary)
  return summaries


def target_baselines(config, workdir: str) -> dict[str, dict[str, float]]:
  """{target task: {"constant": x, "random": y}}: the chance levels of the run's target tasks under
  their metrics, from the same train and test files the methods use (mpt_jax.baselines)."""
  setting = gyms.resolve_setting(config)
  targets = list(config.downstream.tasks) or list(setting.target)
  data = read_tasks(
    resolve_data_dir(config, workdir), targets, config.seeds, ("train", "test"), keep_empty_answers=("test",)
  )
  return baselines.setting_baselines(data, config.seeds)
