"""Downstream: the study's grid of prompt-tuning runs on one target task, trained together.

For a target task, the grid is every (seed, learning rate) pair: 5 seeds x {0.5, 0.4, 0.3, 0.2} = 20 runs
of batch 16 for 3000 steps, dev scored every 50 steps. Instead of 20 runs one after another, the runs
are one vmapped computation over a leading run axis (split over devices when there are several), sharing
the frozen T5. Each run keeps a copy of its best-dev prompt (the reference kept a reference to the live
parameter and so tested the last prompt); the test score of a seed is that of its best-dev learning rate.
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

from mpt_jax import algorithms, logs, metrics, parallel, prompt as prompt_lib
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


@dataclasses.dataclass(frozen=True)
class Run:
  seed: int
  learning_rate: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_lr{self.learning_rate:g}"


def grid_runs(seeds: Sequence[int], learning_rates: Sequence[float]) -> list[Run]:
  return [Run(int(s), float(lr)) for s in seeds for lr in learning_rates]


def make_grid_trainer(loss_fn, optimizer, mesh=None) -> Callable:
  """grid_step(states [R], frozen_params, batches [R, ...], rngs [R]), jitted (sharded by run if a mesh
  with several devices is given and R divides over it)."""
  step = algorithms.make_pt_step(loss_fn, optimizer)
  if mesh is not None and mesh.size > 1:
    return parallel.shard_grid_step(step, mesh)
  return jax.jit(algorithms.make_grid_step(step), donate_argnums=(0,))


def train_grid(grid_step: Callable, states, frozen_params, sampler: batching.GridSampler,
               evaluate_dev: Callable[[jax.Array], np.ndarray], config: GridConfig,
               writer: logs.MetricWriter | None = None, desc: str = "grid"):
  """Trains R runs together; returns (best_prompts [R, P, D] host, best_scores [R], best_steps [R],
  dev_curve: list of (step, scores [R])).

  evaluate_dev(prompts [R, P, D]) -> dev scores [R]. A run's best prompt is a host copy taken when its dev
  score improves (strictly), starting from the initial prompt scored at step 0.
  """
  num_runs = int(np.asarray(states.step).shape[0])
  base_rng = jax.random.PRNGKey(config.seed)
  best_prompts = np.array(jax.device_get(states.prompt))
  best_scores = np.asarray(evaluate_dev(states.prompt), np.float64)
  best_steps = np.zeros(num_runs, np.int64)
  dev_curve = [(0, best_scores.tolist())]
  for step in tqdm(range(config.num_steps), desc=desc, disable=jax.process_index() != 0, mininterval=5):
    rngs = jax.random.split(jax.random.fold_in(base_rng, step), num_runs)
    states, step_metrics = grid_step(states, frozen_params, sampler(step), rngs)
    done = step + 1
    if done % config.eval_every == 0 or done == config.num_steps:
      algorithms.check_finite(step_metrics, step)
      scores = np.asarray(evaluate_dev(states.prompt), np.float64)
      dev_curve.append((done, scores.tolist()))
      improved = _better(scores, best_scores)
      if improved.any():
        prompts = np.asarray(jax.device_get(states.prompt))
        best_prompts[improved] = prompts[improved]
        best_scores[improved] = scores[improved]
        best_steps[improved] = done
      if writer is not None:
        writer.write(done, {"loss": step_metrics["loss"], "dev_score": np.nanmean(scores)}, f"{desc}/")
  return best_prompts, best_scores, best_steps, dev_curve


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

  def __init__(self, predict: Callable, tokenizer, task: str, batch_size: int, metric: str | None = None):
    self.predict = predict  # predict(prompts [R, P, D], batch [R, B, ...]) -> token ids [R, B, T]
    self.tokenizer = tokenizer
    self.task = task
    self.batch_size = batch_size
    self.metric = metric

  def predictions(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> list[list[str]]:
    out: list[list[str]] = [[""] * len(s) for s in splits]
    for eb in batching.grid_eval_batches(splits, self.batch_size):
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
  prompts0 = np.stack([np.asarray(init_prompts[r.seed], np.float32) for r in runs])
  states = algorithms.init_grid_state(prompts0, optimizer, [r.learning_rate for r in runs])
  sampler = batching.GridSampler.create({s: tokenized[(s, "train")] for s in seeds},
                                        [r.seed for r in runs], config.batch_size)
  scorer = Scorer(predict, tokenizer, task, config.eval_batch_size)
  dev_splits = [tokenized[(r.seed, "dev")] for r in runs]
  writer = logs.MetricWriter(os.path.join(out_dir, "logs"))
  try:
    best_prompts, best_dev, best_steps, curve = train_grid(
        grid_step, states, frozen_params, sampler, lambda p: scorer.scores(p, dev_splits), config,
        writer, desc=task)
  finally:
    writer.close()
  chosen = choose_best_runs(runs, best_dev)
  chosen_runs = [chosen[s] for s in seeds]
  test_scores = scorer.scores(jnp.asarray(best_prompts[chosen_runs]),
                              [tokenized[(s, "test")] for s in seeds])
  prompt_dir = os.path.join(out_dir, "prompts")
  for i, run in enumerate(runs):
    prompt_lib.save_prompt(os.path.join(prompt_dir, f"{run.name}.npy"), best_prompts[i],
                           {**(prompt_meta or {}), "task": task, "seed": run.seed,
                            "learning_rate": run.learning_rate, "best_step": int(best_steps[i]),
                            "dev_score": _json_float(best_dev[i])})
  with open(os.path.join(out_dir, "dev_curve.json"), "w", encoding="utf-8") as f:
    json.dump({"runs": [r.name for r in runs],
               "curve": [[step, [_json_float(x) for x in scores]] for step, scores in curve]}, f)
  results = []
  for seed, i, score in zip(seeds, chosen_runs, test_scores):
    results.append({"task": task, "seed": seed, "test_score": _json_float(score),
                    "dev_score": _json_float(best_dev[i]), "best_lr": runs[i].learning_rate,
                    "best_step": int(best_steps[i]), "metric": metrics_name(task)})
    logging.info("%s seed %d: best lr %g (dev %.4f at step %d), test %.4f", task, seed,
                 runs[i].learning_rate, best_dev[i], best_steps[i], score)
  return results


def metrics_name(task: str) -> str:
  from mpt_jax.data.settings import metric_for_task
  return metric_for_task(task)


def _json_float(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None
