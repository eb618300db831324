"""Downstream: the study's grid of prompt-tuning runs on one target task, trained together.

For a target task, the grid is every (seed, learning rate) pair: 5 seeds x {0.5, 0.4, 0.3, 0.2} = 20 runs
of batch 16 for 3000 steps, dev scored every 50 steps. Instead of 20 runs one after another, the runs
are one vmapped computation over a leading run axis (split over devices when there are several), sharing
the frozen T5. Each run keeps a copy of its best-dev prompt (the reference kept a reference to the live
parameter and so tested the last prompt: `test_prompt="last"` does that); the test score of a seed is
that of its best-dev learning rate.

Step budget, as the reference's loop counted it (`for epoch in range(1000): for batch in loader: ...`,
stopping at 3000 steps): a run trains min(num_steps, max_epochs * ceil(train examples / batch)) steps,
so a task of 32 train examples trains 2000 steps, not 3000. The initial prompt is a best-dev candidate
only with `step0_candidate` (the reference's first candidate came after eval_every steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from mpt_jax import algorithms, chunking, logs, metrics, parallel, prompt as prompt_lib
from mpt_jax.data import batching


@dataclasses.dataclass(frozen=True)
class GridConfig:
  learning_rates: Sequence[float]
  batch_size: int
  num_steps: int
  eval_every: int
  eval_batch_size: int
  optimizer: str = "adafactor"
  seed: int = 0
  length_buckets: batching.LengthBuckets = batching.NO_BUCKETS  # of train and eval batches
  max_epochs: int = 0  # cap each run at this many epochs of its train split (0: no cap)
  step0_candidate: bool = False  # score the initial prompt on dev as a best-dev candidate
  test_prompt: str = "best_dev"  # which prompt of the chosen run is tested: "best_dev" | "last"

  def __post_init__(self):
    if self.test_prompt not in TEST_PROMPTS:
      raise ValueError(f"downstream.test_prompt={self.test_prompt!r}: expected one of {TEST_PROMPTS}")
    if self.max_epochs < 0:
      raise ValueError(f"downstream.max_epochs={self.max_epochs}: expected 0 (no epoch cap) or more")
    if self.num_steps < 0 or self.eval_every < 1 or self.batch_size < 1:
      raise ValueError(f"downstream: num_steps={self.num_steps}, eval_every={self.eval_every}, "
                       f"batch_size={self.batch_size}; expected num_steps >= 0 and the others >= 1")


TEST_PROMPTS = ("best_dev", "last")


def step_budget(num_steps: int, max_epochs: int, train_size: int, batch_size: int) -> int:
  """Steps one run trains: num_steps, capped at max_epochs epochs of ceil(train_size / batch_size) steps
  (0 epochs: no cap). The reference's data loader made ceil(N / 16) batches an epoch (2 GPUs x 8, a
  short last batch kept), and its loop ended at whichever came first: epochs or steps."""
  if max_epochs <= 0:
    return num_steps
  return min(num_steps, max_epochs * -(-train_size // batch_size))


@dataclasses.dataclass(frozen=True)
class Run:
  seed: int
  learning_rate: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_lr{self.learning_rate:g}"


def grid_runs(seeds: Sequence[int], learning_rates: Sequence[float]) -> list[Run]:
  return [Run(int(s), float(lr)) for s in seeds for lr in learning_rates]


def make_grid_trainer(loss_fn, optimizer, mesh=None, memory_budget_bytes: int | None = None) -> Callable:
  """grid_step(states [R], frozen_params, batches [R, ...], rngs [R]), jitted (sharded by run if a mesh
  with several devices is given and R divides over it). On one device, the runs go in the fewest
  chunks whose compiled step fits the memory budget (default: the device's free memory; mpt_jax/
  chunking.py), so a grid too big for the device still runs, with the same results."""
  step = algorithms.make_pt_step(loss_fn, optimizer)
  if mesh is not None and mesh.size > 1:
    return parallel.shard_grid_step(step, mesh)
  grid_step = jax.jit(algorithms.make_grid_step(step), donate_argnums=(0,))
  return chunking.RunChunks(grid_step, (0, None, 0, 0), budget_bytes=memory_budget_bytes,
                            name="downstream grid step")


def train_grid(grid_step: Callable, states, frozen_params, sampler: batching.GridSampler,
               evaluate_dev: Callable[[jax.Array], np.ndarray], config: GridConfig,
               writer: logs.MetricWriter | None = None, desc: str = "grid",
               run_steps: Sequence[int] | None = None):
  """Trains R runs together; returns (best_prompts [R, P, D] host, best_scores [R], best_steps [R],
  dev_curve: list of (step, scores [R]), last_prompts [R, P, D] host).

  evaluate_dev(prompts [R, P, D]) -> dev scores [R]. A run's best prompt is a host copy taken when its dev
  score improves (strictly), from its first evaluation on: at step 0 with `config.step0_candidate`, else
  at eval_every (then the initial prompt stays the best only if no dev score is ever defined).
  run_steps: each run's step budget (default config.num_steps for all). The grid steps until the largest;
  a run past its budget keeps stepping with the others, but its later dev scores are not candidates
  (None in the curve) and its last prompt is the one at its budget. Dev is scored every eval_every steps
  and at the end of each budget.
  """
  num_runs = int(np.asarray(states.step).shape[0])
  run_steps = np.full(num_runs, config.num_steps, np.int64) if run_steps is None else \
      np.asarray(run_steps, np.int64)
  total_steps = int(run_steps.max(initial=0))
  eval_steps = set(range(config.eval_every, total_steps + 1, config.eval_every)) | set(run_steps.tolist())
  base_rng = jax.random.PRNGKey(config.seed)
  best_prompts = np.array(jax.device_get(states.prompt))
  last_prompts = best_prompts.copy()
  best_scores = np.full(num_runs, np.nan)
  best_steps = np.zeros(num_runs, np.int64)
  has_candidate = np.zeros(num_runs, bool)
  dev_curve = []
  if config.step0_candidate:
    best_scores = np.asarray(evaluate_dev(states.prompt), np.float64)
    has_candidate[:] = True
    dev_curve.append((0, best_scores.tolist()))
  for step in tqdm(range(total_steps), desc=desc, disable=jax.process_index() != 0, mininterval=5):
    rngs = jax.random.split(jax.random.fold_in(base_rng, step), num_runs)
    states, step_metrics = grid_step(states, frozen_params, sampler(step), rngs)
    done = step + 1
    if done in eval_steps:
      algorithms.check_finite(step_metrics, step)
      in_budget = done <= run_steps
      scores = np.where(in_budget, np.asarray(evaluate_dev(states.prompt), np.float64), np.nan)
      dev_curve.append((done, scores.tolist()))
      improved = in_budget & (~has_candidate | _better(scores, best_scores))
      ended = done == run_steps
      if improved.any() or ended.any():
        prompts = np.asarray(jax.device_get(states.prompt))
        best_prompts[improved] = prompts[improved]
        best_scores[improved] = scores[improved]
        best_steps[improved] = done
        has_candidate |= improved
        last_prompts[ended] = prompts[ended]
      if writer is not None:
        writer.write(done, {"loss": step_metrics["loss"], "dev_score": np.nanmean(scores)}, f"{desc}/")
  return best_prompts, best_scores, best_steps, dev_curve, last_prompts


def _better(new: np.ndarray, best: np.ndarray) -> np.ndarray:
  """Strict improvement; a finite score beats NaN (e.g. an undefined Pearson correlation)."""
  return np.where(np.isnan(best), ~np.isnan(new), new > best)


def choose_best_runs(runs: Sequence[Run], dev_scores: Sequence[float]) -> dict[int, int]:
  """Per seed, the index of its run with the best dev score (the first learning rate on ties)."""
  chosen: dict[int, int] = {}
  for i, run in enumerate(runs):
    j = chosen.get(run.seed)
    if j is None or _better(np.asarray(dev_scores[i]), np.asarray(dev_scores[j])):
      chosen[run.seed] = i
  return chosen


class Scorer:
  """Predictions and CrossFit scores of R prompts on R splits (run r on split r), batched over runs."""

  def __init__(self, predict: Callable, tokenizer, task: str, batch_size: int, metric: str | None = None,
               length_buckets: batching.LengthBuckets = batching.NO_BUCKETS):
    self.predict = predict  # predict(prompts [R, P, D], batch [R, B, ...]) -> token ids [R, B, T]
    self.tokenizer = tokenizer
    self.task = task
    self.batch_size = batch_size
    self.metric = metric
    self.length_buckets = length_buckets

  def predictions(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> list[list[str]]:
    out: list[list[str]] = [[""] * len(s) for s in splits]
    for eb in batching.grid_eval_batches(splits, self.batch_size, self.length_buckets):
      ids = np.asarray(jax.device_get(self.predict(prompts, eb.batch)))
      for r in range(len(splits)):
        real = eb.mask[r].astype(bool)
        # As the study decoded: spaces before punctuation are kept (a tokenizer may default to cleaning
        # them up, which changes EM, ACC and Rouge-L scores).
        texts = self.tokenizer.batch_decode(ids[r][real].tolist(), skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        for index, text in zip(eb.indices[r][real], texts):
          out[r][int(index)] = text
    return out

  def scores(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> np.ndarray:
    preds = self.predictions(prompts, splits)
    return np.asarray([metrics.evaluate(self.task, p, [list(a) for a in s.answers], self.metric)
                       for p, s in zip(preds, splits)], np.float64)


def adapt_task(task: str, *, init_prompts: Mapping[int, np.ndarray], frozen_params, tokenized:
               Mapping[tuple[int, str], batching.TokenizedSplit], grid_step: Callable, optimizer,
               predict: Callable, tokenizer, config: GridConfig, seeds: Sequence[int], out_dir: str,
               prompt_meta: Mapping[str, Any] | None = None) -> list[dict]:
  """The whole grid of one target task; returns one result dict per seed (for mpt_jax.results).

  init_prompts: the starting prompt of each seed's runs [P, D]. tokenized: (seed, split) -> split.
  grid_step / optimizer: from `make_grid_trainer` (built once, shared by every task of the same shapes).
  Writes per-run best prompts and the dev curves under out_dir.
  """
  runs = grid_runs(seeds, config.learning_rates)
  run_steps = [step_budget(config.num_steps, config.max_epochs, len(tokenized[(r.seed, "train")]),
                           config.batch_size) for r in runs]
  if min(run_steps) < config.num_steps:
    logging.info("%s: %d epochs of %s train examples in batches of %d end before %d steps: runs train "
                 "%s steps (the reference's epoch cap)", task, config.max_epochs,
                 sorted({len(tokenized[(s, "train")]) for s in seeds}), config.batch_size,
                 config.num_steps, sorted(set(run_steps)))
  prompts0 = np.stack([np.asarray(init_prompts[r.seed], np.float32) for r in runs])
  states = algorithms.init_grid_state(prompts0, optimizer, [r.learning_rate for r in runs])
  sampler = batching.GridSampler.create({s: tokenized[(s, "train")] for s in seeds},
                                        [r.seed for r in runs], config.batch_size,
                                        buckets=config.length_buckets)
  scorer = Scorer(predict, tokenizer, task, config.eval_batch_size,
                  length_buckets=config.length_buckets)
  dev_splits = [tokenized[(r.seed, "dev")] for r in runs]
  writer = logs.MetricWriter(os.path.join(out_dir, "logs"))
  try:
    best_prompts, best_dev, best_steps, curve, last_prompts = train_grid(
        grid_step, states, frozen_params, sampler, lambda p: scorer.scores(p, dev_splits), config,
        writer, desc=task, run_steps=run_steps)
  finally:
    writer.close()
  chosen = choose_best_runs(runs, best_dev)
  chosen_runs = [chosen[s] for s in seeds]
  tested_prompts, tested_steps = ((last_prompts, run_steps) if config.test_prompt == "last" else
                                  (best_prompts, best_steps))
  test_scores = scorer.scores(jnp.asarray(tested_prompts[chosen_runs]),
                              [tokenized[(s, "test")] for s in seeds])
  prompt_dir = os.path.join(out_dir, "prompts")
  for seed in seeds:  # what training started from: a prompt's change is its task embedding (analysis.py)
    prompt_lib.save_prompt(os.path.join(prompt_dir, f"init_seed{seed}.npy"), init_prompts[seed],
                           {**(prompt_meta or {}), "task": task, "seed": int(seed), "initial": True})
  for i, run in enumerate(runs):
    meta = {**(prompt_meta or {}), "task": task, "seed": run.seed, "learning_rate": run.learning_rate,
            "best_step": int(best_steps[i]), "dev_score": _json_float(best_dev[i]),
            "steps": int(run_steps[i])}
    prompt_lib.save_prompt(os.path.join(prompt_dir, f"{run.name}.npy"), best_prompts[i], meta)
    if config.test_prompt == "last":
      prompt_lib.save_prompt(os.path.join(prompt_dir, f"{run.name}_last.npy"), last_prompts[i], meta)
  with open(os.path.join(out_dir, "dev_curve.json"), "w", encoding="utf-8") as f:
    json.dump({"runs": [r.name for r in runs],
               "curve": [[step, [_json_float(x) for x in scores]] for step, scores in curve]}, f)
  results = []
  for seed, i, score in zip(seeds, chosen_runs, test_scores):
    results.append({"task": task, "seed": seed, "test_score": _json_float(score),
                    "dev_score": _json_float(best_dev[i]), "best_lr": runs[i].learning_rate,
                    "best_step": int(best_steps[i]), "metric": metrics_name(task),
                    # steps the chosen run trained (the epoch cap may end it before num_steps), and
                    # which of its prompts the test score is of
                    "steps": int(run_steps[i]), "test_prompt": config.test_prompt,
                    "tested_step": int(tested_steps[i])})
    logging.info("%s seed %d: best lr %g (dev %.4f at step %d), test %.4f", task, seed,
                 runs[i].learning_rate, best_dev[i], best_steps[i], score)
  return results


def metrics_name(task: str) -> str:
  from mpt_jax.data.settings import metric_for_task
  return metric_for_task(task)


def _json_float(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None
