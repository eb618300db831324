"""One method on one setting, end to end: check inputs, upstream, downstream, results.

Sections, in the order a run meets them:
  1. resolve: the setting's tasks, the data directory (CrossFit or an offline gym), the model.
  2. check: every data file the stages need is read and validated before any compute.
  3. upstream: learn the prompt initialization on the source tasks (train.train_prompt).
  4. downstream: the study's grid on every target task (adapt.adapt_task), results per task.
  5. results: the setting's table, with the relative gain over PT when a PT results file is given.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mpt_jax import (adapt, algorithms, baselines, decode, gyms, metrics, optim, parallel, prompt as prompt_lib,
                     results, train)
from mpt_jax.data import batching, crossfit, settings as settings_lib
from mpt_jax.model import hf
from mpt_jax.model.t5 import T5

REPO_ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_METHODS = ("mtl", "maml", "fomaml", "reptile")


# --- 1. resolve ------------------------------------------------------------------------------------------

def resolve_setting(config) -> settings_lib.Setting:
  if config.gym:
    gyms.ensure(config.gym)
  if config.setting_file:
    return settings_lib.load_setting(config.setting_file)
  return settings_lib.get_setting(config.setting)


def resolve_data_dir(config, workdir: str) -> str:
  """The config's data_dir, or the offline gym's directory (generated on first use)."""
  if config.data_dir:
    return config.data_dir
  if config.gym:
    return gyms.data_dir(config.gym, os.path.join(workdir, os.pardir, "gym_data"))
  raise ValueError("config.data_dir is empty: pass --config.data_dir=/path/to/crossfit_data (the CrossFit "
                   "layout DATA_DIR/{task}/{task}_{k}_{seed}_{split}.tsv), or --config.gym=synthetic for "
                   "the offline gym")


def load_model(config):
  model, frozen_params, tokenizer = hf.load_pretrained(config.model, dtype=config.dtype,
                                                       remat=config.remat_layers)
  model = type(model)(dataclasses.replace(model.config, dropout_rate=config.dropout_rate))
  return model, frozen_params, tokenizer


# --- 2. check --------------------------------------------------------------------------------------------

def read_tasks(data_dir: str, tasks: Sequence[str], seeds: Sequence[int], splits: Sequence[str],
               keep_empty_answers: Sequence[str] = ()):
  """The tasks' files, checked. Lines without an answer are dropped except in `keep_empty_answers`: the
  reference dropped them upstream and kept them in the target tasks' dev and test files (scored 0)."""
  if not tasks:
    return {}
  return crossfit.read_crossfit(data_dir, list(dict.fromkeys(tasks)), seeds, splits,
                                keep_empty_answers=keep_empty_answers)


def check_scorable(target_data) -> None:
  """A metric of the first gold (Classification-F1, Matthew- and Pearson-Correlation) cannot score an
  example without an answer (the reference's scorer failed on it too): refuse before any compute."""
  unscorable = []
  for task, data in target_data.items():
    metric = settings_lib.metric_for_task(task)
    if metric not in metrics.FIRST_GOLD_METRICS:
      continue
    for split in data.splits.values():
      count = sum(not golds for golds in split.answers)
      if count:
        unscorable.append(f"  {split.path}: {count} line(s) without an answer ({metric})")
  if unscorable:
    raise ValueError("these target files have lines without an answer, which their metric (of the "
                     "first gold) cannot score; give them an answer or remove them:\n"
                     + "\n".join(unscorable))


def target_baselines(config, workdir: str) -> dict[str, dict[str, float]]:
  """{target task: {"constant": x, "random": y}}: the chance levels of the run's target tasks under
  their metrics, from the same train and test files the methods use (mpt_jax.baselines)."""
  setting = resolve_setting(config)
  targets = list(config.downstream.tasks) or list(setting.target)
  data = read_tasks(resolve_data_dir(config, workdir), targets, config.seeds, ("train", "test"),
                    keep_empty_answers=("test",))
  return baselines.setting_baselines(data, config.seeds)


def needed_stages(config) -> tuple[bool, bool]:
  stages = set(config.stages)
  unknown = stages - {"upstream", "downstream"}
  if unknown:
    raise ValueError(f"config.stages: unknown stage(s) {sorted(unknown)}; use upstream and/or downstream")
  upstream = "upstream" in stages and config.method in UPSTREAM_METHODS and not config.init_prompt
  return upstream, "downstream" in stages


def prompt_tunes_sources(config) -> bool:
  """PT runs the downstream grid on the source tasks too (task embeddings for mpt_jax.analysis); the
  other methods leave that to PT (a study sets the switch for every method at once)."""
  return (bool(config.downstream.prompt_tune_sources) and config.method == "pt"
          and "downstream" in config.stages)


# --- 3. upstream -----------------------------------------------------------------------------------------

def upstream_sampler(config, source_data, tokenizer, cache_dir):
  """(sample_batch(step), num_steps) of the method: MTL pools batches, meta-learners draw episodes."""
  u = config.upstream
  spec = batching.TextSpec(config.data.max_input_len, u.max_target_len, config.data.input_template)
  tokenized = batching.tokenize_tasks(source_data, tokenizer, spec, cache_dir)
  if config.method == "mtl":
    pool = batching.concat_splits([tokenized[key] for key in sorted(tokenized)], "mtl")
    sampler = batching.EpochSampler(pool, u.batch_size, config.seed)
    return sampler, u.num_steps or sampler.steps_for_epochs(u.num_epochs)
  with_query = config.method != "reptile"
  tasks = batching.meta_tasks(tokenized, list(source_data), config.seeds, with_query=with_query)
  sampler = batching.EpisodeSampler(tasks, u.tasks_per_step, u.inner_steps, u.inner_batch_size,
                                    u.query_size if with_query else None, config.seed)
  return sampler, u.num_steps


def initial_prompt(config, frozen_params, tokenizer, task_names: Sequence[str], seed: int) -> np.ndarray:
  """The configured prompt init: task names (the study's), sampled vocabulary, uniform or label words."""
  p = config.prompt
  embedding = prompt_lib.token_embedding(frozen_params)
  if p.init == "task_names":
    if len(task_names) > p.length:
      logging.info("prompt init: %d task names for %d prompt rows: the first %d fill it (as the reference)",
                   len(task_names), p.length, p.length)
    init = prompt_lib.task_names(embedding, tokenizer, task_names, num_candidates=p.vocab_top_k)
  elif p.init == "vocab":
    init = prompt_lib.sampled_vocab(embedding, tokenizer=tokenizer, num_candidates=p.vocab_top_k)
  elif p.init == "uniform":
    init = prompt_lib.uniform()
  elif p.init == "label_words":
    if not p.label_words:
      raise ValueError("config.prompt.init='label_words' needs config.prompt.label_words")
    init = prompt_lib.label_words(embedding, tokenizer, list(p.label_words), num_candidates=p.vocab_top_k)
  else:
    raise ValueError(f"config.prompt.init={p.init!r}: expected task_names, vocab, uniform or label_words")
  return np.asarray(init(jax.random.PRNGKey(seed), (p.length, embedding.shape[1])))


def run_upstream(config, workdir, model, frozen_params, tokenizer, source_data, mesh, cache_dir):
  u = config.upstream
  out_dir = os.path.join(workdir, "upstream")
  prompt_path = os.path.join(out_dir, "prompt.npy")
  sample_batch, num_steps = upstream_sampler(config, source_data, tokenizer, cache_dir)
  prompt0 = initial_prompt(config, frozen_params, tokenizer, list(source_data), config.seed)
  optimizer = optim.make_optimizer(u.optimizer, u.lr)
  loss_fn = algorithms.make_loss_fn(model, deterministic=config.dropout_rate == 0,
                                    placement=config.prompt.placement)
  method = "mtl" if config.method == "mtl" else config.method
  kwargs = {} if method == "mtl" else {"inner_lr": u.inner_lr, "remat": u.remat_inner}
  put_batch = lambda batch: batch
  if mesh.size > 1 and _divides(sample_batch(0), mesh.size):
    step_fn = parallel.make_sharded_step(method, loss_fn, optimizer, mesh, **kwargs)
    frozen_params = parallel.replicate(frozen_params, mesh)
    put_batch = lambda batch: parallel.shard(batch, mesh)
  else:
    step_fn = algorithms.jit_step(algorithms.make_step(method, loss_fn, optimizer, **kwargs))
  logging.info("upstream: %s on %d source tasks, %d steps", config.method, len(source_data), num_steps)
  state = algorithms.init_state(prompt0, optimizer)
  loop = train.LoopConfig(num_steps, u.checkpoint_every, u.log_every, config.seed)
  state = train.train_prompt(step_fn, state, frozen_params, sample_batch, loop, out_dir, put_batch)
  prompt = np.asarray(jax.device_get(state.prompt))
  prompt_lib.save_prompt(prompt_path, prompt, _prompt_meta(config, model, source_tasks=list(source_data),
                                                          steps=num_steps))
  logging.info("upstream prompt saved to %s", prompt_path)
  return prompt


def _divides(batch, n: int) -> bool:
  return algorithms.common.leading_size(batch, "batch") % n == 0


def _prompt_meta(config, model, **extra):
  return {"model": config.model, "d_model": model.config.d_model, "length": config.prompt.length,
          "placement": config.prompt.placement, "method": config.method, "setting": config.setting,
          **extra}


# --- 4. downstream ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def grid_trainer(model_config, placement: str, optimizer_name: str, mesh):
  """(optimizer, jitted grid step), built once per process for a model and optimizer: every target task
  and every method of a study run reuses the same compiled step (the learning rates are state)."""
  model = T5(model_config)
  loss_fn = algorithms.make_loss_fn(model, deterministic=model_config.dropout_rate == 0,
                                    placement=placement)
  optimizer = optim.make_optimizer(optimizer_name, 1.0)
  return optimizer, adapt.make_grid_trainer(loss_fn, optimizer, mesh)


@functools.lru_cache(maxsize=None)
def _generator(model_config, decoding: str, max_length: int, placement: str, num_beams: int,
               repetition_penalty: float, early_stopping: bool):
  """generate(frozen, prompts [R, P, D], ids [R, B, L], mask) -> tokens [R, B, T], jitted once."""
  model = T5(model_config)
  if decoding == "greedy":
    def one(frozen, prompt, ids, mask):
      return decode.greedy_decode(model, frozen, ids, mask, prompt, max_length=max_length,
                                  placement=placement)
  else:
    def one(frozen, prompt, ids, mask):
      return decode.beam_search(model, frozen, ids, mask, prompt, max_length=max_length,
                                placement=placement, num_beams=num_beams,
                                repetition_penalty=repetition_penalty, early_stopping=early_stopping)
  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


CLASSIFICATION_METRICS = (metrics.ACC, metrics.CLASSIFICATION_F1, metrics.MATTHEW_CORRELATION)


def resolve_decoding(decoding: str, task: str) -> str:
  """The decoding of `task`: "auto" is rank classification for a task scored by a classification
  metric (its answers are a fixed label set) and greedy generation for any other (free-form answers)."""
  if decoding != "auto":
    return decoding
  return "rank" if settings_lib.metric_for_task(task) in CLASSIFICATION_METRICS else "greedy"


def make_predict(config, model, frozen_params, mesh, train_split):
  """predict(prompts [R, P, D], batch [R, B, ...]) -> token ids [R, B, T] with the configured decoding
  (rank classification scores the labels of `train_split`)."""
  d = config.downstream
  placement = config.prompt.placement
  decoding = resolve_decoding(d.decoding, train_split.task)
  if decoding in ("greedy", "beam"):
    generate = _generator(model.config, decoding, d.max_decode_len, placement, d.num_beams,
                          float(d.repetition_penalty), bool(d.early_stopping))
  elif decoding == "rank":
    candidates = decode.label_candidates(train_split)

    def one(frozen, prompt, ids, mask):
      return decode.rank_classify(model, frozen, ids, mask, prompt, candidates=candidates,
                                  placement=placement)
    generate = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))
  else:
    raise ValueError(f"config.downstream.decoding={d.decoding!r}: expected greedy, beam, rank or auto")

  def predict(prompts, batch):
    ids, mask = batch["input_ids"], batch["input_mask"]
    if mesh.size > 1 and ids.shape[0] % mesh.size == 0:
      prompts, ids, mask = parallel.shard((jnp.asarray(prompts), ids, mask), mesh, "runs")
    return generate(frozen_params, prompts, ids, mask)

  return predict


def run_downstream(config, workdir, model, frozen_params, tokenizer, target_data, init_prompt, mesh,
                   cache_dir, out_subdir: str = "downstream", seeds: Sequence[int] | None = None):
  d = config.downstream
  seeds = tuple(config.seeds if seeds is None else seeds)
  spec = batching.TextSpec(config.data.max_input_len, d.max_target_len, config.data.input_template)
  optimizer, grid_step = grid_trainer(model.config, config.prompt.placement, d.optimizer, mesh)
  grid = adapt.GridConfig(tuple(d.lrs), d.batch_size, d.num_steps, d.eval_every, d.eval_batch_size,
                          d.optimizer, config.seed, max_epochs=d.max_epochs,
                          step0_candidate=d.step0_candidate, test_prompt=d.test_prompt)
  summaries = []
  for task, data in target_data.items():
    task_dir = os.path.join(workdir, out_subdir, task)
    done = os.path.join(task_dir, "results.json")
    if os.path.exists(done):
      logging.info("downstream %s: results exist (%s), skipping", task, done)
      summaries.append(results.load_results(done))
      continue
    tokenized = {key[1:]: split for key, split in
                 batching.tokenize_tasks({task: data}, tokenizer, spec, cache_dir).items()}
    if init_prompt is None:  # PT: each seed starts from the target task's own name
      prompts = {s: initial_prompt(config, frozen_params, tokenizer, [task], config.seed + s)
                 for s in seeds}
    else:
      prompts = {s: init_prompt for s in seeds}
    predict = make_predict(config, model, frozen_params, mesh, tokenized[(seeds[0], "train")])
    runs = adapt.adapt_task(task, init_prompts=prompts, frozen_params=frozen_params, tokenized=tokenized,
                            grid_step=grid_step, optimizer=optimizer, predict=predict,
                            tokenizer=tokenizer, config=grid, seeds=seeds, out_dir=task_dir,
                            prompt_meta=_prompt_meta(config, model))
    summary = results.summarize_task(task, runs)
    results.write_task_results(summary, task_dir)
    summaries.append(summary)
  return summaries


# --- the whole run ---------------------------------------------------------------------------------------

def run(config, workdir: str) -> dict | None:
  os.makedirs(workdir, exist_ok=True)
  results.run_record(config, workdir)
  do_upstream, do_downstream = needed_stages(config)
  setting = resolve_setting(config)
  data_dir = resolve_data_dir(config, workdir)
  targets = list(config.downstream.tasks) or list(setting.target)
  unknown = [t for t in targets if t not in setting.target]
  if unknown:
    raise ValueError(f"config.downstream.tasks: {unknown} are not target tasks of {setting.name!r} "
                     f"({list(setting.target)})")
  # Read and validate everything the stages need before loading the model or compiling anything.
  source_data = read_tasks(data_dir, setting.source if do_upstream else (), config.seeds, ("train", "dev"))
  target_data = read_tasks(data_dir, targets if do_downstream else (), config.seeds,
                           ("train", "dev", "test"), keep_empty_answers=("dev", "test"))
  check_scorable(target_data)
  source_seeds = tuple(config.downstream.source_seeds or config.seeds)
  source_runs = read_tasks(data_dir, setting.source if prompt_tunes_sources(config) else (), source_seeds,
                           ("train", "dev", "test"))
  init_prompt = None
  if config.init_prompt:
    init_prompt, _ = prompt_lib.load_prompt(config.init_prompt)
  model, frozen_params, tokenizer = load_model(config)
  if init_prompt is not None and init_prompt.shape[1] != model.config.d_model:
    raise ValueError(f"config.init_prompt {config.init_prompt}: prompt width {init_prompt.shape[1]} != "
                     f"d_model {model.config.d_model} of {config.model}")
  cache_dir = config.cache_dir or os.path.join(workdir, "cache")
  mesh = parallel.make_mesh()
  logging.info("setting %s: %d source, %d target tasks; data %s; %d device(s)", setting.name,
               len(setting.source), len(targets), data_dir, mesh.size)
  if do_upstream:
    init_prompt = run_upstream(config, workdir, model, frozen_params, tokenizer, source_data, mesh,
                               cache_dir)
  elif config.method in UPSTREAM_METHODS and do_downstream and init_prompt is None:
    saved = os.path.join(workdir, "upstream", "prompt.npy")
    if not os.path.exists(saved):
      raise FileNotFoundError(f"{config.method} downstream needs an upstream prompt: none at {saved}; run "
                              f"the upstream stage first or pass --config.init_prompt=path.npy")
    init_prompt, _ = prompt_lib.load_prompt(saved)
  if not do_downstream:
    return None
  summaries = run_downstream(config, workdir, model, frozen_params, tokenizer, target_data, init_prompt,
                             mesh, cache_dir)
  if source_runs:
    logging.info("prompt-tuning the %d source tasks too (config.downstream.prompt_tune_sources)",
                 len(source_runs))
    run_downstream(config, workdir, model, frozen_params, tokenizer, source_runs, init_prompt, mesh,
                   cache_dir, out_subdir="sources", seeds=source_seeds)
  summary = results.summarize_setting(summaries, setting=setting.name, method=config.method,
                                      pt=config.pt_results or None)
  results.write_setting_results(summary, workdir)
  logging.info("results: %s", os.path.join(workdir, "results.md"))
  return summary

