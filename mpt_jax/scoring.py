"""How a target task is scored and trained: its decoding, direction, calibration and objective, in one place.

A run compiles, once, one `DirectionScoring` per direction (`build_scorings`): rank classification in that
direction, every label's score (for the "train_mean" calibration) and the grid step of the label-choice
objective. Each target task then gets one `TaskScoring` (`task_scoring`), the only place that looks at
its direction, decoding and label set: the grid step and label set it trains with, its `predict`, and its
calibration scorer. The stages call what it holds and never ask which form a task is in.

  decoding    config.downstream.decoding: "auto" is rank classification for a classification task,
              greedy generation for any other (`resolve_decoding`)
  direction   config.data.direction: "channel" for a rank-classified task under "channel", else "direct"
              (`task_direction`); a channel task trains on its channel form (`training_form`)
  calibration config.downstream.calibration: "train_mean" subtracts each label's mean score over the
              train inputs (rank classification only)
  objective   config.downstream.objective: "likelihood" (the study's), or a label choice among the task's
              labels (rank classification only)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np

from mpt_jax import adapt, algorithms, chunking, decode, metrics
from mpt_jax.data import batching, settings as settings_lib
from mpt_jax.model import loss as loss_lib

CLASSIFICATION_METRICS = metrics.CLASSIFICATION_METRICS


def resolve_decoding(decoding: str, task: str) -> str:
  """The decoding of `task`: "auto" is rank classification for a task scored by a classification
  metric (its answers are a fixed label set) and greedy generation for any other (free-form answers)."""
  if decoding != "auto":
    return decoding
  return "rank" if settings_lib.metric_for_task(task) in CLASSIFICATION_METRICS else "greedy"


def task_direction(config, task: str) -> str:
  """The form `task` is trained and scored in: "channel" for a task decoded by rank classification when
  config.data.direction is "channel" (a label set to condition on), "direct" otherwise."""
  if config.data.direction == "channel" and resolve_decoding(config.downstream.decoding, task) == "rank":
    return "channel"
  return "direct"


def training_form(config, split: batching.TokenizedSplit) -> batching.TokenizedSplit:
  """A tokenized split as prompt tuning trains on it: its channel form for a channel task."""
  return batching.channel_form(split) if task_direction(config, split.task) == "channel" else split


def runs_in_chunks(fn: Callable, run_axes, mesh, budget_bytes: int | None, name: str) -> Callable:
  """fn over R runs in the fewest chunks of runs that fit the memory (one device; mpt_jax/chunking.py).
  Over several devices the runs are split across them instead."""
  if mesh.size > 1:
    return fn
  return chunking.RunChunks(fn, run_axes, budget_bytes=budget_bytes, name=name)


def make_generate(
  model,
  decoding: str,
  *,
  max_decode_len: int,
  placement: str,
  num_beams: int,
  repetition_penalty: float,
  early_stopping: bool,
) -> Callable:
  """generate(frozen, prompts [R, P, D], ids [R, B, L], mask) -> tokens [R, B, T], jitted."""
  if decoding == "greedy":  # all runs' rows in one decoding loop (see decode.greedy_decode_runs)
    return jax.jit(
      lambda frozen, prompts, ids, mask: decode.greedy_decode_runs(
        model, frozen, ids, mask, prompts, max_length=max_decode_len, placement=placement
      )
    )

  def one(frozen, prompt, ids, mask):
    return decode.beam_search(
      model,
      frozen,
      ids,
      mask,
      prompt,
      max_length=max_decode_len,
      placement=placement,
      num_beams=num_beams,
      repetition_penalty=repetition_penalty,
      early_stopping=early_stopping,
    )

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0)))


@dataclasses.dataclass(frozen=True)
class DirectionScoring:
  """What a classification task in one direction is scored and trained with, compiled at first use."""

  # rank classification of [R] prompts over a task's labels (minus a bias [R, C]): (the chosen labels'
  # token ids [R, B, L], every label's score minus the bias [R, B, C]; `decode.scored_rank_classify`)
  rank: Callable
  # every label's score with every input [R, B, C] for [R] prompts: what "train_mean" averages; None
  # when config.downstream.calibration is "none"
  label_scores: Callable | None
  # the grid step of config.downstream.objective's label choice; None for "likelihood"
  choice_grid_step: Callable | None


def build_scorings(
  config, model, mesh, grid_optimizer, budget_bytes: int | None
) -> dict[str, DirectionScoring]:
  """{direction: DirectionScoring} for both directions (jitted: a direction no task uses never compiles)."""
  d = config.downstream

  def over_runs(fn, name, *, with_bias: bool, **options):
    """decode's `fn`(model, frozen, ids, mask, prompt, candidates=..., placement=..., **options) for [R]
    prompts, vmapped and jitted; `with_bias`: a label bias per run too (rank classification)."""

    def one(frozen, prompt, ids, mask, candidates, *label_bias):
      bias = dict(label_bias=label_bias[0]) if with_bias else {}
      return fn(
        model,
        frozen,
        ids,
        mask,
        prompt,
        candidates=candidates,
        placement=config.prompt.placement,
        **options,
        **bias,
      )

    axes = (None, 0, 0, 0, None) + ((0,) if with_bias else ())
    return runs_in_chunks(jax.jit(jax.vmap(one, in_axes=axes)), axes, mesh, budget_bytes, name)

  def choice_grid_step(direction: str) -> Callable:
    choice_loss = algorithms.make_loss_fn(
      model,
      deterministic=config.dropout_rate == 0,
      placement=config.prompt.placement,
      objective=d.objective,
      direction=direction,
    )
    runs_at_once = algorithms.grid_runs_at_once(d.runs_at_once)
    return adapt.make_grid_trainer(choice_loss, grid_optimizer, mesh, budget_bytes, runs_at_once)

  return {
    direction: DirectionScoring(
      rank=over_runs(
        decode.scored_rank_classify,
        f"{direction} rank classification",
        with_bias=True,
        direction=direction,
      ),
      label_scores=None
      if d.calibration == "none"
      else over_runs(decode.label_scores, f"{direction} label scores", with_bias=False, direction=direction),
      choice_grid_step=None if d.objective == "likelihood" else choice_grid_step(direction),
    )
    for direction in loss_lib.DIRECTIONS
  }


@dataclasses.dataclass(frozen=True)
class TaskScoring:
  """A target task's scoring, resolved once (`task_scoring`)."""

  task: str
  direction: str  # `task_direction`: "channel" or "direct"
  candidates: decode.Candidates | None  # rank classification's label set; None: generation
  grid_step: Callable  # what its prompts train with
  label_set: tuple | None  # (target ids, mask) of its labels under a label-choice objective; else None
  # predict_scored(prompts [R, P, D], batch [R, B, ...], label_bias=None) -> (token ids [R, B, T], every
  # label's score [R, B, C] that rank classification chose from, minus the bias; None for generation), host
  predict_scored: Callable
  # scores(prompts, batch) -> every label's score with every input [R, B, C] (host), for a task that
  # config.downstream.calibration calibrates (rank classification); None for any other
  calibration_scores: Callable | None

  def predict(self, prompts, batch, label_bias=None):
    """The predicted token ids [R, B, T] (host) of `predict_scored`."""
    return self.predict_scored(prompts, batch, label_bias)[0]


def task_scoring(
  config,
  train_split: batching.TokenizedSplit,
  *,
  scorings: Mapping[str, DirectionScoring],
  grid_step: Callable,
  generate: Callable | None,
  on_runs: Callable,
) -> TaskScoring:
  """How `train_split`'s task is decoded and trained: its direction and, under rank classification, its
  label set (the split's, in the direct form); the one place that dispatches on them.

  grid_step: the likelihood grid step; generate: greedy or beam decoding of [R] prompts (None: rank
  only); on_runs(fn, prompts, batch, *per_run): fn(frozen, prompts, ids, mask, *per_run) over the runs
  split across the devices, results on the host (`pipeline.Runtime`)."""
  task = train_split.task
  direction = task_direction(config, task)
  rank = resolve_decoding(config.downstream.decoding, task) == "rank"
  candidates = decode.label_candidates(train_split) if rank else None
  if candidates is None:  # generation: downstream.decoding greedy, beam or auto, so `generate` is set

    def decoder(frozen, prompts, ids, mask, label_bias):
      if label_bias is not None:
        raise ValueError(f"{task}: a label bias needs rank classification")
      return generate(frozen, prompts, ids, mask), None

    return TaskScoring(task, direction, None, grid_step, None, _predict_scored(on_runs, decoder), None)

  scoring = scorings[direction]
  num_labels = candidates.target_ids.shape[0]

  def ranker(frozen, prompts, ids, mask, label_bias):
    if label_bias is None:
      label_bias = np.zeros((ids.shape[0], num_labels), np.float32)
    return scoring.rank(frozen, prompts, ids, mask, candidates, label_bias)

  calibration_scores = None
  if scoring.label_scores is not None:
    calibration_scores = lambda prompts, batch: on_runs(  # noqa: E731
      lambda frozen, *placed: scoring.label_scores(frozen, *placed, candidates), prompts, batch
    )
  if scoring.choice_grid_step is not None:
    label_set = (np.asarray(candidates.target_ids), np.asarray(candidates.target_mask))
    train_step = scoring.choice_grid_step
  else:
    label_set, train_step = None, grid_step
  return TaskScoring(
    task, direction, candidates, train_step, label_set, _predict_scored(on_runs, ranker), calibration_scores
  )


def _predict_scored(on_runs: Callable, decoder: Callable) -> Callable:
  def predict_scored(prompts, batch, label_bias=None):
    return on_runs(
      decoder, prompts, batch, None if label_bias is None else np.asarray(label_bias, np.float32)
    )

  return predict_scored
