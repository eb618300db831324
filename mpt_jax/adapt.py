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

Preemption: the grid is checkpointed at every dev evaluation (run states, best and last prompts, best
scores and steps, dev curve, failed runs, step budgets), so a grid killed at any point and started again
ends with exactly the results and prompts of one that never stopped (the batches and dropout are pure
functions of the step). Divergence: a run whose update fails the guard (non-finite or diverging) is
marked failed at that step and left out of the choice of its seed's learning rate; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from mpt_jax import algorithms, checkpoints, chunking, logs, metrics, parallel, paths, results, throughput
from mpt_jax import prompt as prompt_lib
from mpt_jax.data import batching


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """The grid of one target task; fields are named as in the config (`config.downstream`)."""

  lrs: Sequence[float]
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
      raise ValueError(
        f"downstream: num_steps={self.num_steps}, eval_every={self.eval_every}, "
        f"batch_size={self.batch_size}; expected num_steps >= 0 and the others >= 1"
      )


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


def make_grid_trainer(
  loss_fn, optimizer, mesh=None, memory_budget_bytes: int | None = None, runs_at_once: int | None = None
) -> Callable:
  """grid_step(states [R], frozen_params, batches [R, ...], rngs [R]), jitted (split over the devices by
  run if a mesh with several devices is given; runs are padded to a multiple of them). On one device, the
  runs go in the fewest chunks whose compiled step fits the memory budget (default: the device's free
  memory; mpt_jax/chunking.py), so a grid too big for the device still runs, with the same results.
  runs_at_once: how many runs the step computes together (`algorithms.make_grid_step`; None: all)."""
  step = algorithms.make_pt_step(loss_fn, optimizer)
  if mesh is not None and mesh.size > 1:
    return parallel.shard_grid_step(step, mesh, runs_at_once)
  grid_step = jax.jit(algorithms.make_grid_step(step, runs_at_once), donate_argnums=(0,))
  return chunking.RunChunks(
    grid_step, (0, None, 0, 0), budget_bytes=memory_budget_bytes, name="downstream grid step"
  )


@dataclasses.dataclass
class GridProgress:
  """What a grid of R runs has found so far, on the host (checkpointed at every dev evaluation).

  A run's best prompt is a copy taken when its dev score improves (strictly); its last prompt the one at
  the end of its step budget; failed_steps[r] the step at which run r failed the guard (0: it did not).
  """

  best_prompts: np.ndarray  # [R, P, D]
  last_prompts: np.ndarray  # [R, P, D]
  best_scores: np.ndarray  # [R] float64, NaN until the first candidate (or a run without a defined score)
  best_steps: np.ndarray  # [R]
  has_candidate: np.ndarray  # [R] bool
  failed_steps: np.ndarray  # [R]
  dev_curve: list  # (step, scores [R] with None where a run was not a candidate)
  # this invocation's time and memory (mpt_jax/throughput.py; not checkpointed): None if it trained no step
  throughput: dict | None = None

  @classmethod
  def start(cls, prompts: np.ndarray) -> GridProgress:
    num_runs = prompts.shape[0]
    return cls(
      prompts.copy(),
      prompts.copy(),
      np.full(num_runs, np.nan),
      np.zeros(num_runs, np.int64),
      np.zeros(num_runs, bool),
      np.zeros(num_runs, np.int64),
      [],
    )

  def meta(self) -> dict:
    """The JSON part of a checkpoint (floats exact: JSON keeps a float64's shortest repr)."""
    return {
      "best_scores": _json_floats(self.best_scores),
      "best_steps": self.best_steps.tolist(),
      "has_candidate": self.has_candidate.tolist(),
      "failed_steps": self.failed_steps.tolist(),
      "dev_curve": [[step, _json_floats(scores)] for step, scores in self.dev_curve],
    }

  @classmethod
  def from_checkpoint(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> GridProgress:
    return cls(
      np.array(arrays["best_prompts"]),
      np.array(arrays["last_prompts"]),
      _floats(meta["best_scores"]),
      np.asarray(meta["best_steps"], np.int64),
      np.asarray(meta["has_candidate"], bool),
      np.asarray(meta["failed_steps"], np.int64),
      [(int(step), _floats(scores).tolist()) for step, scores in meta["dev_curve"]],
    )


@jax.jit
def _note_failures(failed_steps: jax.Array, update_ok: jax.Array, step: jax.Array) -> jax.Array:
  """Each run's first step that failed the guard (0: none yet), kept on the device between evaluations."""
  return jnp.where((failed_steps == 0) & ~update_ok, step, failed_steps)


def train_grid(
  grid_step: Callable,
  states,
  frozen_params,
  sampler: batching.GridSampler,  # sampler(step, runs=indices) -> those runs' batches
  evaluate_dev: Callable[[jax.Array], np.ndarray],
  config: GridConfig,
  writer: logs.MetricWriter | None = None,
  desc: str = "grid",
  run_steps: Sequence[int] | None = None,
  checkpointer: checkpoints.Checkpointer | None = None,
  checkpoint_meta: Mapping[str, Any] | None = None,
  run_names: Sequence[str] | None = None,
  mesh=None,
  run_writers: logs.RunWriters | None = None,
) -> GridProgress:
  """Trains R runs together; returns their GridProgress at the end.

  evaluate_dev(prompts [R, P, D]) -> dev scores [R]. A run's first candidate for the best prompt is at
  step 0 with `config.step0_candidate`, else at eval_every (then the initial prompt stays the best only if
  no dev score is ever defined). run_steps: each run's step budget (default config.num_steps for all).
  The grid steps until the largest; a run past its budget keeps stepping with the others, but its later
  dev scores are not candidates (None in the curve) and its last prompt is the one at its budget; the
  same holds for a run from the step it failed the guard. Dev is scored every eval_every steps and at the
  end of each budget.
  checkpointer: saves the states and the progress at every evaluation (with `checkpoint_meta`), and
  restores the latest at the start, so that a killed grid resumes where it stopped. The states are saved
  as host arrays of the R runs, so a grid resumes on another number of devices or processes too.
  mesh: the runs are split over its data axis (`parallel.RunLayout`: padded to a multiple of it, each
  process feeding only its own runs); `grid_step` must be the trainer of the same mesh. None: one device.
  writer: the grid's mean loss and dev score (and its time and memory) at every evaluation; run_writers
  (by `run_names`): each run's own loss and dev score there, while it is healthy and in its budget.
  """
  num_runs = int(np.asarray(states.step).shape[0])
  layout = parallel.RunLayout(mesh, num_runs)
  run_steps = (
    np.full(num_runs, config.num_steps, np.int64) if run_steps is None else np.asarray(run_steps, np.int64)
  )
  names = list(run_names) if run_names is not None else [f"run {r}" for r in range(num_runs)]
  total_steps = int(run_steps.max(initial=0))
  eval_steps = set(range(config.eval_every, total_steps + 1, config.eval_every)) | set(run_steps.tolist())
  base_rng = jax.random.PRNGKey(config.seed)
  states = parallel.to_host(states)
  progress = GridProgress.start(np.array(states.prompt))
  start = 0
  restored = (
    None
    if checkpointer is None
    else checkpointer.restore_latest(
      {"states": states, "best_prompts": progress.best_prompts, "last_prompts": progress.last_prompts}
    )
  )
  if restored is not None:
    if restored.meta.get("run_steps") != run_steps.tolist():
      raise ValueError(
        f"{checkpointer.directory}: the checkpointed grid has step budgets "
        f"{restored.meta.get('run_steps')}, this one {run_steps.tolist()}; use a fresh --workdir"
      )
    start, states = restored.step, restored.arrays["states"]
    progress = GridProgress.from_checkpoint(restored.arrays, restored.meta)
    logging.info("%s: resuming the grid from step %d (%s)", desc, start, checkpointer.directory)
  elif config.step0_candidate:
    progress.best_scores = np.asarray(evaluate_dev(states.prompt), np.float64)
    progress.has_candidate[:] = True
    progress.dev_curve.append((0, progress.best_scores.tolist()))
  states = layout.put(states)
  failed_steps = layout.put(progress.failed_steps.astype(np.int32))
  bar = tqdm(
    range(start, total_steps),
    initial=start,
    total=total_steps,
    desc=desc,
    disable=jax.process_index() != 0,
    mininterval=5,
  )
  meter = throughput.StageMeter(f"downstream/{desc}", total_steps, start)
  with meter:
    for step in bar:
      rngs = layout.put(jax.random.split(jax.random.fold_in(base_rng, step), num_runs))
      batches = layout.put_local(sampler(step, runs=layout.local))
      states, step_metrics = grid_step(states, frozen_params, batches, rngs)
      meter.after_step(batches, step_metrics)
      done = step + 1
      failed_steps = _note_failures(failed_steps, step_metrics["update_ok"], done)
      if done not in eval_steps:
        continue
      failed = layout.to_host(failed_steps).astype(np.int64)  # the interval's host sync
      perf = meter.interval(done)
      bar.set_postfix_str(throughput.progress_text(perf), refresh=False)
      meter.pause()  # dev scoring and the checkpoint are not step time
      for r in np.flatnonzero((failed > 0) & (progress.failed_steps == 0)):
        logging.warning(
          "%s: %s failed the guard at step %d (a non-finite or diverging update): left out of "
          "its seed's choice of learning rate; the other runs go on",
          desc,
          names[r],
          failed[r],
        )
      progress.failed_steps = failed
      in_budget = (done <= run_steps) & (failed == 0)
      prompts = layout.to_host(states.prompt)
      scores = np.where(in_budget, np.asarray(evaluate_dev(prompts), np.float64), np.nan)
      progress.dev_curve.append((done, scores.tolist()))
      improved = in_budget & (~progress.has_candidate | _better(scores, progress.best_scores))
      ended = done == run_steps
      if improved.any() or ended.any():
        progress.best_prompts[improved] = prompts[improved]
        progress.best_scores[improved] = scores[improved]
        progress.best_steps[improved] = done
        progress.has_candidate |= improved
        progress.last_prompts[ended] = prompts[ended]
      if writer is not None or run_writers is not None:
        healthy = failed == 0
        loss = layout.to_host(step_metrics["loss"]).astype(np.float64)
      if run_writers is not None:
        run_writers.write(
          done,
          {
            names[r]: {
              **({"loss": loss[r]} if healthy[r] else {}),
              **({"dev_score": scores[r]} if in_budget[r] else {}),
            }
            for r in range(num_runs)
          },
        )
      if writer is not None:
        writer.write(
          done,
          {
            "loss": loss[healthy].mean() if healthy.any() else np.nan,
            "dev_score": np.nanmean(scores) if in_budget.any() else np.nan,
            **{f"perf/{k}": v for k, v in perf.items()},
          },
          f"{desc}/",
        )
      if checkpointer is not None:
        checkpointer.save(
          done,
          {
            "states": layout.to_host(states),
            "best_prompts": progress.best_prompts,
            "last_prompts": progress.last_prompts,
          },
          {**(checkpoint_meta or {}), **progress.meta(), "run_steps": run_steps.tolist()},
          force=True,
        )
      meter.resume()
  if meter.summary()["steps"]:
    progress.throughput = {**meter.summary(), "runs": num_runs}
  return progress


def _json_floats(values) -> list:
  return [float(x) if np.isfinite(x) else None for x in np.asarray(values, np.float64)]


def _floats(values) -> np.ndarray:
  return np.asarray([np.nan if x is None else x for x in values], np.float64)


def _better(new: np.ndarray, best: np.ndarray) -> np.ndarray:
  """Strict improvement; a finite score beats NaN (e.g. an undefined Pearson correlation)."""
  return np.where(np.isnan(best), ~np.isnan(new), new > best)


def choose_best_runs(
  runs: Sequence[Run], dev_scores: Sequence[float], failed: Sequence[bool] | None = None
) -> dict[int, int]:
  """Per seed, the index of its run with the best dev score (the first learning rate on ties); failed runs
  are left out (a seed whose runs all failed has none)."""
  chosen: dict[int, int] = {}
  for i, run in enumerate(runs):
    if failed is not None and failed[i]:
      continue
    j = chosen.get(run.seed)
    if j is None or _better(np.asarray(dev_scores[i]), np.asarray(dev_scores[j])):
      chosen[run.seed] = i
  return chosen


class Scorer:
  """Predictions and CrossFit scores of R prompts on R splits (run r on split r), batched over runs.

  predict(prompts [R, P, D], batch [R, B, ...][, label_bias [R, C]]) -> token ids [R, B, T]; with
  `scored`, it returns (token ids, every label's score [R, B, C] or None) instead (`scoring.TaskScoring.
  predict_scored`), and `labels` names the C labels of those scores.
  calibration: (label_scores, {seed: train split}) for rank classification with the "train_mean"
  calibration (config.downstream.calibration): before each scoring, every run's label bias is its labels'
  mean score over its seed's train inputs under its prompt (`label_scores(prompts, batch)` -> [R, B, C]),
  and `predict` subtracts it; None: the scores as they are."""

  def __init__(
    self,
    predict: Callable,
    tokenizer,
    task: str,
    batch_size: int,
    metric: str | None = None,
    length_buckets: batching.LengthBuckets = batching.NO_BUCKETS,
    calibration: tuple[Callable, Mapping[int, batching.TokenizedSplit]] | None = None,
    scored: bool = False,
    labels: Sequence[str] | None = None,
  ):
    self.predict_scored = predict if scored else (lambda *args: (predict(*args), None))
    self.tokenizer = tokenizer
    self.task = task
    self.batch_size = batch_size
    self.metric = metric
    self.length_buckets = length_buckets
    self.calibration = calibration
    self.labels = tuple(labels) if labels is not None else None

  def label_bias(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> np.ndarray:
    """[R, C]: run r's labels' mean score over the train inputs of splits[r]'s seed, under prompts[r]."""
    label_scores, train_splits = self.calibration
    calibration_splits = [train_splits[s.seed] for s in splits]
    total, count = 0.0, np.zeros((len(splits), 1))
    for eb in batching.grid_eval_batches(calibration_splits, self.batch_size, self.length_buckets):
      scores = np.asarray(jax.device_get(label_scores(prompts, eb.batch)), np.float64)  # [R, B, C]
      mask = np.asarray(eb.mask, np.float64)[..., None]
      total = total + (scores * mask).sum(axis=1)
      count = count + mask.sum(axis=1)
    return total / np.maximum(count, 1.0)

  def scored_predictions(
    self, prompts, splits: Sequence[batching.TokenizedSplit]
  ) -> tuple[list[list[str]], list[np.ndarray] | None]:
    """Each run's predicted texts (in its split's order) and, under rank classification, every label's
    score with each of its examples [N, C] (what it chose from; None otherwise)."""
    out: list[list[str]] = [[""] * len(s) for s in splits]
    label_scores: list[np.ndarray] | None = None
    extra = () if self.calibration is None else (self.label_bias(prompts, splits),)
    for eb in batching.grid_eval_batches(splits, self.batch_size, self.length_buckets):
      ids, scores = self.predict_scored(prompts, eb.batch, *extra)
      ids = np.asarray(jax.device_get(ids))
      if scores is not None and label_scores is None:
        label_scores = [np.full((len(s), scores.shape[-1]), np.nan, np.float32) for s in splits]
      for r in range(len(splits)):
        real = eb.mask[r].astype(bool)
        # As the study decoded: spaces before punctuation are kept (a tokenizer may default to cleaning
        # them up, which changes EM, ACC and Rouge-L scores).
        texts = self.tokenizer.batch_decode(
          ids[r][real].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        for index, text in zip(eb.indices[r][real], texts):
          out[r][int(index)] = text
        if scores is not None:
          label_scores[r][eb.indices[r][real]] = np.asarray(scores[r])[real]
    return out, label_scores

  def predictions(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> list[list[str]]:
    return self.scored_predictions(prompts, splits)[0]

  def score_texts(self, predictions: Sequence[Sequence[str]], splits) -> np.ndarray:
    """The metric of each run's predictions on its split."""
    return np.asarray(
      [
        metrics.evaluate(self.task, p, [list(a) for a in s.answers], self.metric)
        for p, s in zip(predictions, splits)
      ],
      np.float64,
    )

  def scores(self, prompts, splits: Sequence[batching.TokenizedSplit]) -> np.ndarray:
    return self.score_texts(self.predictions(prompts, splits), splits)

  def prediction_records(
    self,
    splits: Sequence[batching.TokenizedSplit],
    predicted: tuple[list[list[str]], list[np.ndarray] | None],
    runs: Sequence[Mapping[str, Any]],
  ) -> list[dict]:
    """One JSON record per example of each split from `scored_predictions`' output: its run (`runs[r]`:
    seed, learning rate, step), split, index, input (as the model read it, decoded), golds and
    prediction, and under rank classification every label's score (after any calibration bias)."""
    texts, label_scores = predicted
    records = []
    for r, split in enumerate(splits):
      inputs = self.tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(split.input_ids, split.input_lengths)],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
      )
      for i in range(len(split)):
        record = {
          **runs[r],
          "split": split.split,
          "index": i,
          "input": inputs[i],
          "gold": list(split.answers[i]),
          "prediction": texts[r][i],
        }
        if label_scores is not None and self.labels is not None:
          record["label_scores"] = dict(zip(self.labels, _json_floats(label_scores[r][i])))
        records.append(record)
    return records


def adapt_task(
  task: str,
  *,
  init_prompts: Mapping[int, np.ndarray],
  frozen_params,
  tokenized: Mapping[tuple[int, str], batching.TokenizedSplit],
  grid_step: Callable,
  optimizer,
  predict: Callable,
  tokenizer,
  config: GridConfig,
  seeds: Sequence[int],
  out_dir: str,
  prompt_meta: Mapping[str, Any] | None = None,
  mesh=None,
  label_set: tuple[np.ndarray, np.ndarray] | None = None,
  calibration: tuple[Callable, Mapping[int, batching.TokenizedSplit]] | None = None,
  labels: Sequence[str] | None = None,
) -> list[dict]:
  """The whole grid of one target task; returns one result dict per seed (for mpt_jax.results).

  init_prompts: the starting prompt of each seed's runs [P, D]. tokenized: (seed, split) -> split.
  grid_step / optimizer: from `make_grid_trainer` (built once, shared by every task of the same shapes).
  predict: `scoring.TaskScoring.predict_scored` (token ids, and every label's score under rank
  classification, whose label texts are `labels`).
  Writes per-run best prompts, the dev curves, and the dev and test predictions of each seed's tested
  prompt (results.PREDICTIONS_FILE) under out_dir; checkpoints the grid in
  out_dir/checkpoints (with `prompt_meta`) until the results are written, and resumes from there.
  mesh: the one `grid_step` is sharded over (see `train_grid`). In a multi-process run every process
  trains and scores the grid; only the primary one writes files.
  label_set: the task's labels (ids, mask [C, L]) for a `grid_step` with a label-choice objective: every
  train batch carries them (`batching.GridSampler`).
  calibration: rank classification's "train_mean" calibration, for dev and test alike (see `Scorer`).
  """
  runs = grid_runs(seeds, config.lrs)
  run_steps = [
    step_budget(config.num_steps, config.max_epochs, len(tokenized[(r.seed, "train")]), config.batch_size)
    for r in runs
  ]
  if min(run_steps) < config.num_steps:
    logging.info(
      "%s: %d epochs of %s train examples in batches of %d end before %d steps: runs train "
      "%s steps (the reference's epoch cap)",
      task,
      config.max_epochs,
      sorted({len(tokenized[(s, "train")]) for s in seeds}),
      config.batch_size,
      config.num_steps,
      sorted(set(run_steps)),
    )
  prompts0 = np.stack([np.asarray(init_prompts[r.seed], np.float32) for r in runs])
  states = algorithms.init_grid_state(prompts0, optimizer, [r.learning_rate for r in runs])
  sampler = batching.GridSampler.create(
    {s: tokenized[(s, "train")] for s in seeds},
    [r.seed for r in runs],
    config.batch_size,
    buckets=config.length_buckets,
    label_set=label_set,
  )
  scorer = Scorer(
    predict,
    tokenizer,
    task,
    config.eval_batch_size,
    length_buckets=config.length_buckets,
    calibration=calibration,
    scored=True,
    labels=labels,
  )
  dev_splits = [tokenized[(r.seed, "dev")] for r in runs]
  checkpoint_dir = paths.join(out_dir, "checkpoints")
  checkpointer = checkpoints.Checkpointer(checkpoint_dir)
  writer = logs.MetricWriter(paths.join(out_dir, "logs"))
  run_writers = logs.RunWriters(paths.join(out_dir, "logs", "runs"), [r.name for r in runs])
  try:
    progress = train_grid(
      grid_step,
      states,
      frozen_params,
      sampler,
      lambda p: scorer.scores(p, dev_splits),
      config,
      writer,
      desc=task,
      run_steps=run_steps,
      checkpointer=checkpointer,
      checkpoint_meta=prompt_meta,
      run_names=[r.name for r in runs],
      mesh=mesh,
      run_writers=run_writers,
    )
    failed = progress.failed_steps > 0
    chosen = choose_best_runs(runs, progress.best_scores, failed)
    _mark_choices(run_writers, runs, progress, chosen)
  finally:
    checkpointer.close()
    writer.close()
    run_writers.close()
  if progress.throughput is not None and parallel.is_primary():
    throughput.write_summary(progress.throughput, paths.join(out_dir, "logs"))
  tested_prompts, tested_steps = (
    (progress.last_prompts, run_steps)
    if config.test_prompt == "last"
    else (progress.best_prompts, progress.best_steps)
  )
  tested_seeds = [s for s in seeds if s in chosen]
  tested = tested_prompts[[chosen[s] for s in tested_seeds]]
  tested_runs = [
    {"seed": s, "learning_rate": runs[chosen[s]].learning_rate, "step": int(tested_steps[chosen[s]])}
    for s in tested_seeds
  ]
  predictions = []
  test_scores = {}
  if tested_seeds:
    for split in ("dev", "test"):
      splits = [tokenized[(s, split)] for s in tested_seeds]
      predicted = scorer.scored_predictions(tested, splits)
      predictions += scorer.prediction_records(splits, predicted, tested_runs)
      if split == "test":
        test_scores = dict(zip(tested_seeds, scorer.score_texts(predicted[0], splits)))
  if parallel.is_primary():
    _write_prompts(
      out_dir,
      task=task,
      seeds=seeds,
      runs=runs,
      init_prompts=init_prompts,
      progress=progress,
      run_steps=run_steps,
      failed=failed,
      config=config,
      prompt_meta=prompt_meta,
    )
    paths.write_text(
      paths.join(out_dir, results.PREDICTIONS_FILE), "".join(json.dumps(r) + "\n" for r in predictions)
    )
  seed_results = []
  for seed in seeds:
    failures = [
      {"learning_rate": runs[i].learning_rate, "step": int(progress.failed_steps[i])}
      for i in range(len(runs))
      if runs[i].seed == seed and failed[i]
    ]
    if seed not in chosen:
      logging.warning(
        "%s seed %d: every learning rate failed the guard (%s): no test score", task, seed, failures
      )
      seed_results.append(
        {
          "task": task,
          "seed": seed,
          "test_score": None,
          "metric": metrics_name(task),
          "failed_runs": failures,
        }
      )
      continue
    i = chosen[seed]
    score = test_scores[seed]
    seed_results.append(
      {
        "task": task,
        "seed": seed,
        "test_score": _json_float(score),
        "dev_score": _json_float(progress.best_scores[i]),
        "best_lr": runs[i].learning_rate,
        "best_step": int(progress.best_steps[i]),
        "metric": metrics_name(task),
        # steps the chosen run trained (the epoch cap may end it before num_steps), and
        # which of its prompts the test score is of
        "steps": int(run_steps[i]),
        "test_prompt": config.test_prompt,
        "tested_step": int(tested_steps[i]),
        "failed_runs": failures,
      }
    )
    logging.info(
      "%s seed %d: best lr %g (dev %.4f at step %d), test %.4f",
      task,
      seed,
      runs[i].learning_rate,
      progress.best_scores[i],
      progress.best_steps[i],
      score,
    )
  return seed_results


def _mark_choices(
  run_writers: logs.RunWriters, runs: Sequence[Run], progress: GridProgress, chosen: Mapping[int, int]
) -> None:
  """Marks the best-dev selection in each run's TensorBoard series: every run's best dev score at its
  best step ("best_dev_score"), and its seed's chosen run's ("chosen_dev_score", with its learning rate)."""
  chosen_runs = set(chosen.values())
  for i, run in enumerate(runs):
    if not progress.has_candidate[i] or not np.isfinite(progress.best_scores[i]):
      continue
    marks = {"best_dev_score": progress.best_scores[i]}
    if i in chosen_runs:
      marks.update(chosen_dev_score=progress.best_scores[i], chosen_learning_rate=run.learning_rate)
    run_writers.write(int(progress.best_steps[i]), {run.name: marks})


def _write_prompts(
  out_dir: str,
  *,
  task: str,
  seeds: Sequence[int],
  runs: Sequence[Run],
  init_prompts: Mapping[int, np.ndarray],
  progress: GridProgress,
  run_steps: Sequence[int],
  failed: np.ndarray,
  config: GridConfig,
  prompt_meta: Mapping[str, Any] | None,
) -> None:
  """Each seed's initial prompt, each run's best (and with test_prompt="last", last) prompt, and the dev
  curves, under out_dir."""
  prompt_dir = paths.join(out_dir, "prompts")
  for seed in seeds:  # what training started from: a prompt's change is its task embedding (analysis.py)
    prompt_lib.save_prompt(
      paths.join(prompt_dir, f"init_seed{seed}.npy"),
      init_prompts[seed],
      {**(prompt_meta or {}), "task": task, "seed": int(seed), "initial": True},
    )
  for i, run in enumerate(runs):
    meta = {
      **(prompt_meta or {}),
      "task": task,
      "seed": run.seed,
      "learning_rate": run.learning_rate,
      "best_step": int(progress.best_steps[i]),
      "dev_score": _json_float(progress.best_scores[i]),
      "steps": int(run_steps[i]),
    }
    if failed[i]:
      meta["failed_at_step"] = int(progress.failed_steps[i])
    prompt_lib.save_prompt(paths.join(prompt_dir, f"{run.name}.npy"), progress.best_prompts[i], meta)
    if config.test_prompt == "last":
      prompt_lib.save_prompt(paths.join(prompt_dir, f"{run.name}_last.npy"), progress.last_prompts[i], meta)
  _write_json_atomic(
    paths.join(out_dir, results.DEV_CURVE_FILE),
    {
      "runs": [r.name for r in runs],
      "seeds": [r.seed for r in runs],
      "learning_rates": [r.learning_rate for r in runs],
      "curve": [[step, [_json_float(x) for x in scores]] for step, scores in progress.dev_curve],
    },
  )


def remove_checkpoints(out_dir: str) -> None:
  """Drops a finished grid's checkpoints (its results and prompts are written): they are large."""
  paths.remove(paths.join(out_dir, "checkpoints"), recursive=True)


def _write_json_atomic(path: str, value) -> None:
  paths.write_text(path, json.dumps(value))


def metrics_name(task: str) -> str:
  from mpt_jax.data.settings import metric_for_task

  return metric_for_task(task)


def _json_float(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None
