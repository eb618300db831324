"""Can prompt tuning move this frozen model? Three measurements, on the WordNet gym, in a few minutes.

1. Encoder swap: does the decoder read the encoder? For N train inputs of a task (no prompt, labels
   teacher-forced), the KL divergence of the first target token's distribution when each example's
   encoder output is replaced by another example's (rolled by one) and when it is zeroed, and the label
   loss with the own vs another example's encoding. A prompt acts only through the encoder output: a
   decoder that ignores it cannot be steered.
2. Overfit check: can a prompt memorize a fixed batch? Prompt tuning (Adafactor, dropout off) on 16
   fixed train examples for S steps, at several prompt lengths; the loss per target token, the label
   token's loss, and the accuracy on those 16 examples by rank classification and by greedy generation.
   A prompt that cannot fit 16 two-label examples will not learn the task from them.
3. Dev accuracy of those memorizing prompts (rank classification), for what it is worth: 16 examples
   and no early stopping.
4. Continuations: the first output token's distribution after plain text whose next word the corpus
   states ("The opposite of hot is"): entropy and top tokens.
5. Free-encoding oracle: the overfit check with 16 free vectors appended to the encoder output in place of
   a prompt (same RMS as the encoder's outputs). Whether the decoder can be driven to the labels at all;
   with `--oracle_per_example` also 16 free vectors per example (an input-dependent encoding at its best).
6. Ceilings (`--ceiling_tasks`): on a task's whole train file, scored on its test file by the task's metric
   beside the constant answer: a linear probe of the frozen encoder's mean output (is what the task needs in
   the encoder at all?) and full fine-tuning of the model (what 16 shots per class can teach this model when
   every weight may move; prompt tuning moves far fewer).
7. Direction (`--direction_tasks`): prompt tuning as the mini-study runs it (task-name init, 60 Adafactor
   steps of 8, learning rates 0.5 / 0.3, dev every 20 steps, the best-dev prompt tested), in the study's
   direct form (the model reads the input and scores each label) and in the noisy-channel form (Min et
   al. 2022: the model reads the prompt and a label and scores the input, trained on p(input | label));
   beside each, the zero-shot score without a prompt. Is what the model knows reachable in the direction
   it was pretrained to predict (text from a short head)? `--direction_objective=label_choice` trains the
   gold's cross-entropy among the task's labels instead of the token cross-entropy (config.downstream.objective);
   `--direction_calibration=train_mean` subtracts each label's mean score over the task's train inputs before
   rank classification chooses (config.downstream.calibration), for the zero-shot and the tuned prompts alike.
8. Zero-shot rank classification (`--zero_shot_tasks`): no prompt, no training; per direction and per
   calibration (none, train_mean), the dev and test scores and how many test inputs get each label. Does
   the model spread its answers over the labels, or give most inputs one label?
9. Initial prompts (`--init_tasks`): rank classification with each prompt init of `--inits`, untrained
   (config.prompt.init: task_names, vocab, uniform; token:<piece> for init "token" with that
   config.prompt.init_token; none: no prompt), in measurement 7's `--direction_forms` (the first) and
   `--direction_calibration`, dev and test. Where does prompt tuning start, against no prompt at all?

  python experiments/diagnose_pt.py --model=assets/small_t5 --out=experiments/results/diagnosis/small_t5.json

Everything is a pure function of the arguments (fixed examples, fixed prompt-init seed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mpt_jax import algorithms, baselines, decode, gyms, host_memory, metrics, optim, prompt as prompt_lib  # noqa: E402
from mpt_jax import config as config_lib  # noqa: E402
from mpt_jax.data import batching, crossfit  # noqa: E402
from mpt_jax.data.settings import metric_for_task  # noqa: E402
from mpt_jax.model import hf  # noqa: E402
from mpt_jax.model.loss import shift_right, target_log_likelihoods, weights_loss  # noqa: E402
from mpt_jax.model.t5 import T5  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
GYM_DIR = gyms.WORDNET_GYM_DIR
gyms.ensure("wordnet")  # the gym's tasks and settings in the registry (their metrics, for scoring)
SPEC = batching.TextSpec(max_input_len=64, max_target_len=8)  # the demo/mini presets' lengths


def read_split(gym_dir, task: str, seed: int, split: str, tokenizer) -> batching.TokenizedSplit:
  data = crossfit.read_crossfit(gym_dir, [task], [seed], [split])[task]
  return batching.tokenize_split(data.splits[(seed, split)], tokenizer, SPEC)


def encoder_swap(model, params, split: batching.TokenizedSplit, n: int) -> dict:
  """KL(first token | own encoding || other / zeroed encoding) and label loss, own vs other."""
  batch = batching.make_batch(split, np.arange(min(n, len(split))))
  encoded, mask = model.apply({"params": params}, batch["input_ids"], batch["input_mask"], method=T5.encode)
  decoder_in = shift_right(jnp.asarray(batch["target_ids"]), model.config.decoder_start_token_id)

  def logits_with(enc, enc_mask):
    return model.apply({"params": params}, enc, enc_mask, decoder_in, method=T5.decode)

  own = logits_with(encoded, mask)
  other = logits_with(jnp.roll(encoded, 1, axis=0), jnp.roll(mask, 1, axis=0))
  zeroed = logits_with(jnp.zeros_like(encoded), mask)

  def kl_first(p_logits, q_logits):
    p, q = jax.nn.log_softmax(p_logits[:, 0]), jax.nn.log_softmax(q_logits[:, 0])
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1)))

  target_mask = jnp.asarray(batch["target_mask"], jnp.float32)

  def label_loss(logits):
    ll = target_log_likelihoods(logits, batch["target_ids"])
    return float(-jnp.sum(ll * target_mask) / jnp.sum(target_mask))

  return {
    "task": split.task,
    "examples": int(batch["input_ids"].shape[0]),
    "kl_first_token_other_encoding": kl_first(own, other),
    "kl_first_token_zeroed_encoding": kl_first(own, zeroed),
    "label_loss_own": label_loss(own),
    "label_loss_other": label_loss(other),
  }


def overfit(
  model,
  params,
  tokenizer,
  train: batching.TokenizedSplit,
  dev: batching.TokenizedSplit,
  prompt_length: int,
  steps: int,
  lr: float,
  n: int,
  init_seed: int,
  optimizer_name: str = "adafactor",
  placement: str = "prepend",
) -> dict:
  """Prompt tuning on a fixed batch of n train examples; losses and accuracies along the way."""
  batch = {k: jnp.asarray(v) for k, v in batching.make_batch(train, np.arange(n)).items()}
  embedding = prompt_lib.token_embedding(params)
  prompt0 = prompt_lib.sampled_vocab(embedding, tokenizer=tokenizer)(
    jax.random.PRNGKey(init_seed), (prompt_length, embedding.shape[1])
  )
  optimizer = optim.make_optimizer(optimizer_name, lr)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True, placement=placement)
  step = algorithms.jit_step(algorithms.make_pt_step(loss_fn, optimizer))
  state = algorithms.init_state(prompt0, optimizer)
  candidates = decode.label_candidates(train)

  @jax.jit
  def label_token_loss(prompt):  # the first target token (the label word's first piece)
    ll = target_log_likelihoods(
      model.apply(
        {"params": params},
        batch["input_ids"],
        batch["input_mask"],
        shift_right(batch["target_ids"], 0),
        prompt=prompt,
        placement=placement,
      ),
      batch["target_ids"],
    )
    return -jnp.mean(ll[:, 0])

  def accuracy(prompt, split, rows, how):
    b = batching.make_batch(split, rows)
    if how == "rank":
      ids = decode.rank_classify(
        model, params, b["input_ids"], b["input_mask"], prompt, candidates=candidates, placement=placement
      )
    else:
      ids = decode.greedy_decode(
        model, params, b["input_ids"], b["input_mask"], prompt, max_length=8, placement=placement
      )
    texts = tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
    golds = [split.answers[i] for i in rows]
    return float(np.mean([t.strip() in g for t, g in zip(texts, golds)])), texts

  curve = []
  rng = jax.random.PRNGKey(0)
  t0 = time.time()
  for s in range(steps + 1):
    if s % max(steps // 6, 1) == 0 or s == steps:
      curve.append([s, float(loss_fn(state.prompt, params, batch, rng))])
    if s < steps:
      state, _ = step(state, params, batch, rng)
  seconds = time.time() - t0
  rows = np.arange(n)
  rank_acc, _ = accuracy(state.prompt, train, rows, "rank")
  gen_acc, gen_texts = accuracy(state.prompt, train, rows, "greedy")
  dev_rows = np.arange(len(dev))
  dev_rank, dev_texts = accuracy(state.prompt, dev, dev_rows, "rank")
  majority = max(np.mean([a[0] == c for a in dev.answers]) for c in candidates.texts)
  return {
    "task": train.task,
    "prompt_length": prompt_length,
    "steps": steps,
    "lr": lr,
    "examples": n,
    "optimizer": optimizer_name,
    "placement": placement,
    "loss_curve": curve,
    "final_loss": curve[-1][1],
    "label_token_loss": float(label_token_loss(state.prompt)),
    "train_rank_accuracy": rank_acc,
    "train_generation_accuracy": gen_acc,
    "generations": sorted(set(gen_texts))[:8],
    "dev_rank_accuracy": dev_rank,
    "dev_predicted_labels": sorted(set(dev_texts)),
    "dev_majority_accuracy": float(majority),
    "seconds": round(seconds, 1),
  }


def free_encoding_oracle(
  model,
  params,
  train: batching.TokenizedSplit,
  n: int,
  steps: int,
  rows: int = 16,
  lr: float = 0.1,
  per_example: bool = False,
) -> dict:
  """Can the decoder be driven to the labels at all? `rows` free vectors appended to the encoder output
  (kept at the encoder outputs' RMS, so they are no louder than real ones), trained with Adam on the n fixed
  examples instead of a prompt. A prompt reaches the decoder only through the frozen encoder; if free
  encoder outputs fit the labels far better than a prompt does, the encoder is the bottleneck.
  per_example: each example gets its own `rows` free vectors (what an input-dependent encoding could do
  at best); shared ones can only set a prior over the labels."""
  import optax

  batch = {k: jnp.asarray(v) for k, v in batching.make_batch(train, np.arange(n)).items()}
  encoded, mask = model.apply({"params": params}, batch["input_ids"], batch["input_mask"], method=T5.encode)
  scale = jnp.sqrt(jnp.mean(jnp.square(encoded[mask.astype(bool)])))
  decoder_in = shift_right(batch["target_ids"], model.config.decoder_start_token_id)
  target_mask = batch["target_mask"].astype(jnp.float32)

  def token_ll(free):
    free = free / jnp.sqrt(jnp.mean(jnp.square(free), axis=-1, keepdims=True) + 1e-6) * scale
    enc = jnp.concatenate([jnp.broadcast_to(free, (n, rows, free.shape[-1])), encoded], axis=1)
    enc_mask = jnp.concatenate([jnp.ones((n, rows), bool), mask.astype(bool)], axis=1)
    logits = model.apply({"params": params}, enc, enc_mask, decoder_in, method=T5.decode)
    return target_log_likelihoods(logits, batch["target_ids"])

  def loss(free):
    return -jnp.sum(token_ll(free) * target_mask) / jnp.sum(target_mask)

  optimizer = optax.adam(lr)
  shape = (n, rows, encoded.shape[-1]) if per_example else (rows, encoded.shape[-1])
  free = jax.random.normal(jax.random.PRNGKey(0), shape)
  state = optimizer.init(free)

  @jax.jit
  def step(free, state):
    value, grad = jax.value_and_grad(loss)(free)
    updates, state = optimizer.update(grad, state)
    return optax.apply_updates(free, updates), state, value

  curve = []
  for s in range(steps):
    free, state, value = step(free, state)
    if s % max(steps // 6, 1) == 0:
      curve.append([s, float(value)])
  ll = token_ll(free)
  return {
    "task": train.task,
    "rows": rows,
    "per_example": per_example,
    "steps": steps,
    "lr": lr,
    "examples": n,
    "loss_curve": curve,
    "final_loss": float(loss(free)),
    "label_token_loss": float(-jnp.mean(ll[:, 0])),
  }


def score_labels(split: batching.TokenizedSplit, predictions: list[str]) -> float:
  """The task's score (its gym metric) of one predicted label per example."""
  return metrics.evaluate(split.task, predictions, [list(a) for a in split.answers])


def linear_probe(
  model, params, train: batching.TokenizedSplit, test: batching.TokenizedSplit, steps: int = 500
) -> dict:
  """Softmax regression on the frozen encoder's mean output (no prompt), standardized features, L2 1e-3,
  Adam lr 0.05 on the whole train file: the test score by the task's metric."""
  import optax

  labels = sorted({a[0] for a in train.answers})

  def features(split):
    batch = batching.make_batch(split, np.arange(len(split)))
    encoded, mask = model.apply({"params": params}, batch["input_ids"], batch["input_mask"], method=T5.encode)
    mask = jnp.asarray(mask, jnp.float32)[..., None]
    return jnp.sum(encoded * mask, 1) / jnp.sum(mask, 1)

  x_train, x_test = features(train), features(test)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  y = jnp.asarray([labels.index(a[0]) for a in train.answers])
  w = jnp.zeros((x_train.shape[1], len(labels))), jnp.zeros(len(labels))

  def loss(w):
    logits = x_train @ w[0] + w[1]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]) + 1e-3 * jnp.sum(w[0] ** 2)

  optimizer = optax.adam(0.05)
  state = optimizer.init(w)
  grad = jax.jit(jax.value_and_grad(loss))
  for _ in range(steps):
    value, g = grad(w)
    updates, state = optimizer.update(g, state)
    w = optax.apply_updates(w, updates)
  train_acc = float(jnp.mean(jnp.argmax(x_train @ w[0] + w[1], -1) == y))
  predictions = [labels[int(i)] for i in jnp.argmax(x_test @ w[0] + w[1], -1)]
  return {
    "train_loss": float(value),
    "train_accuracy": train_acc,
    "test_score": score_labels(test, predictions),
  }


def train_all_weights(
  model, params, train: batching.TokenizedSplit, steps: int, lr: float, batch_size: int = 16, seed: int = 0
):
  """Full fine-tuning (every weight, AdamW, no dropout) on shuffled batches of a split (its first gold):
  -> (tuned params, [[step, loss], ...])."""
  import optax

  optimizer = optax.adamw(lr, weight_decay=0.0)
  state = optimizer.init(params)

  @jax.jit
  def step(p, state, batch):
    value, g = jax.value_and_grad(lambda p: weights_loss(model, p, batch))(p)
    updates, state = optimizer.update(g, state, p)
    return optax.apply_updates(p, updates), state, value

  rng = np.random.default_rng(seed)
  tuned, curve = params, []
  for s in range(steps):
    rows = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
    batch = {k: jnp.asarray(v) for k, v in batching.make_batch(train, rows).items()}
    tuned, state, value = step(tuned, state, batch)
    if s % max(steps // 5, 1) == 0 or s == steps - 1:
      curve.append([s, float(value)])
  return tuned, curve


def fine_tune(
  model,
  params,
  tokenizer,
  train: batching.TokenizedSplit,
  test: batching.TokenizedSplit,
  steps: int = 150,
  lr: float = 3e-4,
  batch_size: int = 16,
) -> dict:
  """Full fine-tuning on the whole train file (train_all_weights); the test score by rank classification
  over the train labels, by the task's metric."""
  tuned, curve = train_all_weights(model, params, train, steps, lr, batch_size)
  candidates = decode.label_candidates(train)
  b = batching.make_batch(test, np.arange(len(test)))
  ids = decode.rank_classify(model, tuned, b["input_ids"], b["input_mask"], None, candidates=candidates)
  predictions = tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
  return {
    "steps": steps,
    "lr": lr,
    "loss_curve": curve,
    "test_score": score_labels(test, predictions),
  }


def ceilings(
  model, params, tokenizer, gym_dir, task: str, seed: int, probe_steps: int = 500, fine_tune_steps: int = 150
) -> dict:
  splits = crossfit.read_crossfit(gym_dir, [task], [seed], ["train", "test"])[task].splits
  raw_train, raw_test = splits[(seed, "train")], splits[(seed, "test")]
  train, test = (batching.tokenize_split(s, tokenizer, SPEC) for s in (raw_train, raw_test))
  return {
    "task": task,
    "seed": seed,
    "metric": metric_for_task(task),
    "train_examples": len(train),
    "constant_answer": baselines.constant_answer_score(raw_train, raw_test),
    "linear_probe": linear_probe(model, params, train, test, probe_steps),
    "fine_tune": fine_tune(model, params, tokenizer, train, test, fine_tune_steps),
  }


def ceiling_summary(rows: list[dict]) -> dict:
  """Per task, then averaged over tasks: the mean over seeds of the constant answer, the linear probe and
  fine-tuning (test scores x100)."""
  keys = {
    "constant": lambda r: r["constant_answer"],
    "linear_probe": lambda r: r["linear_probe"]["test_score"],
    "fine_tune": lambda r: r["fine_tune"]["test_score"],
  }
  return summarize_rows(rows, keys)


def summarize_rows(rows: list[dict], keys: dict) -> dict:
  """{"per_task": {task: {key: mean over its rows x100, ..., "seeds": n}}, "average": {key: mean over
  tasks}} of the scores `keys[key](row)`; the average is of the unrounded task means."""
  tasks = sorted({r["task"] for r in rows})
  means = {
    t: {k: 100 * float(np.mean([f(r) for r in rows if r["task"] == t])) for k, f in keys.items()}
    for t in tasks
  }
  per_task = {
    t: dict({k: round(v, 1) for k, v in m.items()}, seeds=sum(r["task"] == t for r in rows))
    for t, m in means.items()
  }
  average = {k: round(float(np.mean([m[k] for m in means.values()])), 1) for k in keys}
  return {"per_task": per_task, "average": average}


CHANNEL_SPEC = batching.TextSpec(max_input_len=64, max_target_len=8, input_template="{input}")
DIRECTIONS = ("direct", "channel")


def rank_predictions(
  model, params, tokenizer, split, candidates, prompt, direction: str, calibration_split=None
) -> list[str]:
  """The label each example of `split` gets by rank classification in `direction` (see measurement 7);
  with a `calibration_split` (the task's train split), each label's mean score over its inputs is
  subtracted first (`decode.CALIBRATIONS`' "train_mean")."""
  classify = decode.channel_rank_classify if direction == "channel" else decode.rank_classify
  bias = None
  if calibration_split is not None:
    c = batching.make_batch(calibration_split, np.arange(len(calibration_split)))
    scores = decode.label_scores(
      model, params, c["input_ids"], c["input_mask"], prompt, candidates=candidates, direction=direction
    )
    bias = decode.label_bias(scores)
  b = batching.make_batch(split, np.arange(len(split)))
  ids = classify(
    model, params, b["input_ids"], b["input_mask"], prompt, candidates=candidates, label_bias=bias
  )
  return tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)


@functools.cache
def _pt_step(model, lr: float, objective: str = "likelihood", direction: str = "direct"):
  """(optimizer, jitted PT step) per learning rate and objective, built once: every task and seed reuses
  its compilation."""
  optimizer = optim.make_optimizer("adafactor", lr)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True, objective=objective, direction=direction)
  return optimizer, algorithms.jit_step(algorithms.make_pt_step(loss_fn, optimizer))


def prompt_tune_direction(
  model,
  params,
  tokenizer,
  splits: dict,
  direction: str,
  seed: int,
  steps: int = 60,
  batch_size: int = 8,
  lrs: tuple[float, ...] = (0.5, 0.3),
  eval_every: int = 20,
  prompt_length: int = 16,
  objective: str = "likelihood",
  calibration: str = "none",
) -> dict:
  """Prompt tuning of one task and seed in `direction`, the mini-study's grid: per learning rate, a
  task-name-initialized prompt trained on shuffled batches (the same order for both directions),
  scored on dev every `eval_every` steps; the best dev score over all (lr, step) is tested. `objective`:
  the trained loss (`algorithms.OBJECTIVES`, config.downstream.objective), the token cross-entropy by
  default; a label-choice objective gets the task's train labels with every batch, as the pipeline's grid.
  `calibration`: `decode.CALIBRATIONS` (config.downstream.calibration), for dev and test alike.

  `splits`: {"train", "dev", "test"} -> TokenizedSplit in the direct form (the study's input template
  for "direct", `CHANNEL_SPEC`'s bare input for "channel"); the channel trainer reads
  `batching.channel_form(train)`."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction {direction!r}: expected one of {DIRECTIONS}")
  if calibration not in decode.CALIBRATIONS:
    raise ValueError(f"calibration {calibration!r}: expected one of {decode.CALIBRATIONS}")
  train, dev, test = splits["train"], splits["dev"], splits["test"]
  task = train.task
  candidates = decode.label_candidates(train)
  fit = batching.channel_form(train) if direction == "channel" else train
  embedding = prompt_lib.token_embedding(params)
  prompt0 = prompt_lib.task_names(embedding, tokenizer, [task])(
    jax.random.PRNGKey(seed), (prompt_length, embedding.shape[1])
  )

  calibration_split = train if calibration == "train_mean" else None

  def score(prompt, split):
    return score_labels(
      split,
      rank_predictions(model, params, tokenizer, split, candidates, prompt, direction, calibration_split),
    )

  label_set = {"label_ids": candidates.target_ids, "label_mask": candidates.target_mask}
  best = {"dev": -1.0}
  for lr in lrs:
    optimizer, step = _pt_step(model, lr, objective, direction)
    state = algorithms.init_state(prompt0, optimizer)
    order_rng, queue = np.random.default_rng(seed), np.zeros(0, np.int64)
    for s in range(1, steps + 1):
      if len(queue) < batch_size:
        queue = np.concatenate([queue, order_rng.permutation(len(fit))])
      rows, queue = queue[:batch_size], queue[batch_size:]
      batch = batching.make_batch(fit, rows)
      if objective != "likelihood":
        batch.update(label_set)
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      state, metrics_ = step(state, params, batch, jax.random.PRNGKey(s))
      if s % eval_every == 0:
        dev_score = score(state.prompt, dev)
        if dev_score > best["dev"]:
          prompt = jnp.asarray(np.array(state.prompt))  # a copy: the next step donates the state's buffers
          best = {"dev": dev_score, "lr": lr, "step": s, "loss": float(metrics_["loss"]), "prompt": prompt}
  return {
    "direction": direction,
    "objective": objective,
    "calibration": calibration,
    "zero_shot_no_prompt": score(None, test),
    "initial_prompt": score(prompt0, test),
    "best_lr": best["lr"],
    "best_step": best["step"],
    "train_loss_at_best": best["loss"],
    "dev_score": best["dev"],
    "test_score": score(best["prompt"], test),
  }


def directions(
  model, params, tokenizer, gym_dir, task: str, seed: int, forms: tuple[str, ...] = DIRECTIONS, **grid
) -> dict:
  """Measurement 7 for one task and seed: prompt tuning in each of `forms` (direct, channel), beside the
  constant answer."""
  raw = crossfit.read_crossfit(gym_dir, [task], [seed], ["train", "dev", "test"])[task].splits
  row = {
    "task": task,
    "seed": seed,
    "metric": metric_for_task(task),
    "constant_answer": baselines.constant_answer_score(raw[(seed, "train")], raw[(seed, "test")]),
  }
  for direction, spec in (("direct", SPEC), ("channel", CHANNEL_SPEC)):
    if direction not in forms:
      continue
    splits = {
      name: batching.tokenize_split(raw[(seed, name)], tokenizer, spec) for name in ("train", "dev", "test")
    }
    row[direction] = prompt_tune_direction(model, params, tokenizer, splits, direction, seed, **grid)
  return row


def zero_shot(model, params, tokenizer, gym_dir, task: str, seed: int) -> dict:
  """Measurement 8 for one task and seed: rank classification without a prompt, in both directions (each
  with its own input form, as measurement 7), uncalibrated and calibrated by the train inputs."""
  raw = crossfit.read_crossfit(gym_dir, [task], [seed], ["train", "dev", "test"])[task].splits
  row = {"task": task, "seed": seed, "metric": metric_for_task(task)}
  for direction, spec in (("direct", SPEC), ("channel", CHANNEL_SPEC)):
    train, dev, test = (
      batching.tokenize_split(raw[(seed, n)], tokenizer, spec) for n in ("train", "dev", "test")
    )
    candidates = decode.label_candidates(train)
    for calibration in decode.CALIBRATIONS:
      calibration_split = train if calibration == "train_mean" else None
      predictions = {
        name: rank_predictions(
          model, params, tokenizer, split, candidates, None, direction, calibration_split
        )
        for name, split in (("dev", dev), ("test", test))
      }
      counts = {label: predictions["test"].count(label) for label in sorted(set(predictions["test"]))}
      row[f"{direction}/{calibration}"] = {
        "dev_score": score_labels(dev, predictions["dev"]),
        "test_score": score_labels(test, predictions["test"]),
        "test_label_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
      }
  return row


MEASURED_INITS = ("task_names", "vocab", "uniform", "token")  # measurement 9's (label_words needs words)


def initial_prompt_of(spec: str, embedding, tokenizer, task: str, seed: int, length: int):
  """Measurement 9's prompt for one init `spec` (see the module doc), as the pipeline makes it for PT
  (`prompt_lib.initializer` with the target's task name; the seed as the init rng); None for "none"."""
  name, _, piece = spec.partition(":")
  if name == "none":
    return None
  if name not in MEASURED_INITS:
    raise ValueError(f"--inits: {spec!r} is not one of none, {', '.join(MEASURED_INITS)} (token:<piece>)")
  prompt_config = config_lib.base_config("pt", "cls2cls").prompt  # the study's prompt keys, then these
  prompt_config.update(init=name, length=length, init_token=piece or prompt_lib.DEFAULT_INIT_TOKEN)
  return prompt_lib.configured_prompt(prompt_config, embedding, tokenizer, [task], seed)


def initial_prompts(
  model, params, tokenizer, gym_dir, task: str, seed: int, inits, direction: str, calibration: str, length=16
) -> dict:
  """Measurement 9 for one task and seed: dev and test scores of each untrained initial prompt."""
  raw = crossfit.read_crossfit(gym_dir, [task], [seed], ["train", "dev", "test"])[task].splits
  spec = CHANNEL_SPEC if direction == "channel" else SPEC
  train, dev, test = (
    batching.tokenize_split(raw[(seed, n)], tokenizer, spec) for n in ("train", "dev", "test")
  )
  candidates = decode.label_candidates(train)
  calibration_split = train if calibration == "train_mean" else None
  embedding = prompt_lib.token_embedding(params)
  row = {"task": task, "seed": seed, "metric": metric_for_task(task), "direction": direction}
  row["calibration"] = calibration
  for init in inits:
    prompt = initial_prompt_of(init, embedding, tokenizer, task, seed, length)
    row[init] = {
      f"{name}_score": score_labels(
        split,
        rank_predictions(model, params, tokenizer, split, candidates, prompt, direction, calibration_split),
      )
      for name, split in (("dev", dev), ("test", test))
    }
  return row


def initial_prompt_summary(rows: list[dict]) -> dict:
  """Per task, then averaged over tasks: mean over seeds (x100) of each init's dev and test scores."""
  inits = [k for k, v in rows[0].items() if isinstance(v, dict)]
  keys = {
    f"{init}/{split}": lambda r, init=init, split=split: r[init][f"{split}_score"]
    for init in inits
    for split in ("dev", "test")
  }
  return summarize_rows(rows, keys)


def zero_shot_summary(rows: list[dict]) -> dict:
  """Per task, then averaged over tasks: mean over seeds (x100) of each form's dev and test scores."""
  keys = {}
  for form in (k for k in rows[0] if "/" in k):
    for split in ("dev", "test"):
      keys[f"{form}/{split}"] = lambda r, form=form, split=split: r[form][f"{split}_score"]
  return summarize_rows(rows, keys)


def direction_summary(rows: list[dict]) -> dict:
  """Per task, then averaged over tasks: mean over seeds (x100) of the constant answer and, per direction,
  prompt tuning's test score and the zero-shot score without a prompt."""
  keys = {"constant": lambda r: r["constant_answer"]}
  for d in (d for d in DIRECTIONS if all(d in r for r in rows)):
    keys[f"{d}_pt"] = lambda r, d=d: r[d]["test_score"]
    keys[f"{d}_zero_shot"] = lambda r, d=d: r[d]["zero_shot_no_prompt"]
  return summarize_rows(rows, keys)


# Plain continuations whose next word a reader of the corpus knows (its documents state these facts).
CONTINUATIONS = (
  "The opposite of hot is",
  "The opposite of good is",
  "Dog (noun): a member of the genus Canis. Dog is a kind of",
  "Oak (noun): a tree of the genus Quercus. Oak is a kind of",
  "Temple orange (noun): large citrus tree. Temple orange is a kind of",
)


def continuations(model, params, tokenizer, texts=CONTINUATIONS) -> list[dict]:
  """The first target token's distribution after plain text (no prompt): its entropy and top tokens.
  A decoder that only reads what the input is about, not where it stops, answers with format tokens."""
  enc = tokenizer(list(texts), padding=True, return_tensors="np")
  start = np.zeros((len(texts), 1), np.int32)
  logits = model.apply({"params": params}, enc["input_ids"], enc["attention_mask"], start)
  probs = np.asarray(jax.nn.softmax(logits[:, 0]), np.float64)
  rows = []
  for text, p in zip(texts, probs):
    top = np.argsort(-p)[:3]
    rows.append(
      {
        "input": text,
        "entropy": float(-(p * np.log(p + 1e-12)).sum()),
        "top": [[tokenizer.convert_ids_to_tokens(int(i)), round(float(p[i]), 3)] for i in top],
      }
    )
  return rows


def markdown_table(reports: list[dict]) -> str:
  """One row per report (diagnose_pt.py --out files): encoder swap, then the overfit checks."""
  lines = [
    "| model | encoder-swap KL (first token) | zeroed-encoder KL | label loss own / other | "
    "overfit: final loss (label token) | train rank acc. | continuation entropy |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in reports:
    swap = r.get("encoder_swap", [])
    kl = " / ".join(f"{x['kl_first_token_other_encoding']:.3f}" for x in swap)
    zero = " / ".join(f"{x['kl_first_token_zeroed_encoding']:.2f}" for x in swap)
    labels = " / ".join(f"{x['label_loss_own']:.2f}-{x['label_loss_other']:.2f}" for x in swap[:1])
    fits = "; ".join(
      f"{x['task'].removeprefix('wn-')} P{x['prompt_length']}: {x['final_loss']:.2f} ({x['label_token_loss']:.2f})"
      for x in r.get("overfit", [])
    )
    accs = " / ".join(f"{x['train_rank_accuracy']:.2f}" for x in r.get("overfit", []))
    cont = r.get("continuations")
    entropy = f"{np.mean([c['entropy'] for c in cont]):.2f}" if cont else "-"
    lines.append(f"| {r.get('name', r['model'])} | {kl} | {zero} | {labels} | {fits} | {accs} | {entropy} |")
  return "\n".join(lines) + "\n"


def measure_tasks_and_seeds(
  report, key, summary_key, tasks: str, seeds: str, default_seed: int, measure, summarize
) -> None:
  """report[key]: measure(task, seed) for every comma-separated task and seed (none given: default_seed),
  each row printed as it comes; then report[summary_key] = summarize(rows) when there are rows."""
  seed_list = [int(x) for x in seeds.split(",") if x] or [default_seed]
  for task in filter(None, tasks.split(",")):
    for seed in seed_list:
      row = measure(task, seed)
      report.setdefault(key, []).append(row)
      print(json.dumps(row), flush=True)
  if report.get(key):
    report[summary_key] = summarize(report[key])
    print(json.dumps(report[summary_key]), flush=True)


def add_tasks_and_seeds(parser, name: str, measurement: str) -> None:
  """--<name>_tasks (none: the measurement is skipped) and --<name>_seeds (none: --seed)."""
  parser.add_argument(
    f"--{name}_tasks", default="", help=f"{measurement} on these tasks (comma-separated); empty: skip"
  )
  parser.add_argument(
    f"--{name}_seeds", default="", help=f"{measurement} on these gym seeds (comma-separated); empty: --seed"
  )


def main(argv=None):
  host_memory.reuse_freed_memory()  # before JAX runs anything (mpt_jax/host_memory.py)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=str(REPO_ROOT / "assets" / "small_t5"))
  p.add_argument("--gym_dir", default=str(GYM_DIR))
  p.add_argument("--swap_tasks", default="wn-noun_category_living,wn-antonym_pair,wn-part_of_speech")
  p.add_argument("--swap_examples", type=int, default=32)
  p.add_argument("--overfit_tasks", default="wn-antonym_pair,wn-noun_category_living")
  p.add_argument("--prompt_lengths", default="16,50,100")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--lr", type=float, default=0.5)
  p.add_argument("--optimizer", default="adafactor", help="adafactor (the study's), adamw or sgd")
  p.add_argument("--examples", type=int, default=16)
  p.add_argument(
    "--placement", default="prepend", help="where the prompt goes: prepend, suffix or after_padding"
  )
  p.add_argument("--seed", type=int, default=100, help="the gym's data seed (file) to read")
  p.add_argument("--skip_overfit", action="store_true")
  p.add_argument(
    "--oracle_per_example",
    action="store_true",
    help="also run the free-encoding oracle with free vectors per example (not shared)",
  )
  add_tasks_and_seeds(p, "ceiling", "measurement 6 (ceilings), e.g. the wn_cls2cls targets")
  add_tasks_and_seeds(p, "direction", "measurement 7 (direct vs channel prompt tuning)")
  p.add_argument(
    "--direction_forms", default="direct,channel", help="measurement 7's forms (comma-separated)"
  )
  p.add_argument("--direction_prompt_length", type=int, default=16, help="measurement 7's prompt length")
  p.add_argument(
    "--direction_objective",
    default="likelihood",
    choices=algorithms.OBJECTIVES,
    help="measurement 7's trained loss (config.downstream.objective)",
  )
  p.add_argument(
    "--direction_calibration",
    default="none",
    choices=decode.CALIBRATIONS,
    help="measurement 7's rank classification (config.downstream.calibration)",
  )
  add_tasks_and_seeds(p, "zero_shot", "measurement 8 (zero-shot rank classification, raw and calibrated)")
  add_tasks_and_seeds(p, "init", "measurement 9 (untrained initial prompts)")
  p.add_argument(
    "--inits",
    default="none,task_names,vocab,uniform,token:</s>",
    help="measurement 9's initial prompts (comma-separated): none, task_names, vocab, uniform, token:<piece>",
  )
  p.add_argument("--out", default="")
  p.add_argument("--table", nargs="+", default=None, help="print the markdown table of these --out files")
  args = p.parse_args(argv)
  if args.table:
    reports = [dict(json.loads(Path(f).read_text()), name=Path(f).stem) for f in args.table]
    print(markdown_table(reports))
    return reports

  forms = tuple(args.direction_forms.split(","))
  if not forms or any(f not in DIRECTIONS for f in forms):
    p.error(f"--direction_forms={args.direction_forms!r}: expected a comma-separated subset of {DIRECTIONS}")

  t0 = time.time()
  model, params, tokenizer = hf.load_pretrained(args.model)
  report = {
    "model": args.model,
    "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "args": vars(args),
    "encoder_swap": [],
    "overfit": [],
    "continuations": continuations(model, params, tokenizer),
  }
  for row in report["continuations"]:
    print(json.dumps(row), flush=True)
  for task in filter(None, args.swap_tasks.split(",")):
    row = encoder_swap(
      model, params, read_split(args.gym_dir, task, args.seed, "train", tokenizer), args.swap_examples
    )
    report["encoder_swap"].append(row)
    print(json.dumps(row), flush=True)
  if not args.skip_overfit:
    for task in filter(None, args.overfit_tasks.split(",")):
      train = read_split(args.gym_dir, task, args.seed, "train", tokenizer)
      dev = read_split(args.gym_dir, task, args.seed, "dev", tokenizer)
      # A fixed, class-balanced-as-it-comes batch: the first n examples of the shuffled train file.
      for length in map(int, args.prompt_lengths.split(",")):
        row = overfit(
          model,
          params,
          tokenizer,
          train,
          dev,
          length,
          args.steps,
          args.lr,
          args.examples,
          init_seed=args.seed,
          optimizer_name=args.optimizer,
          placement=args.placement,
        )
        report["overfit"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "generations"}), flush=True)
      for per_example in (False, True) if args.oracle_per_example else (False,):
        row = free_encoding_oracle(model, params, train, args.examples, args.steps, per_example=per_example)
        report.setdefault("free_encoding_oracle", []).append(row)
        print(json.dumps(row), flush=True)
  measurements = (  # (flag prefix, report key, summary key, measure(task, seed), summarize)
    (
      "ceiling",
      "ceilings",
      "ceiling_summary",
      lambda task, seed: ceilings(model, params, tokenizer, args.gym_dir, task, seed),
      ceiling_summary,
    ),
    (
      "direction",
      "directions",
      "direction_summary",
      lambda task, seed: directions(
        model,
        params,
        tokenizer,
        args.gym_dir,
        task,
        seed,
        forms=forms,
        prompt_length=args.direction_prompt_length,
        objective=args.direction_objective,
        calibration=args.direction_calibration,
      ),
      direction_summary,
    ),
    (
      "zero_shot",
      "zero_shot",
      "zero_shot_summary",
      lambda task, seed: zero_shot(model, params, tokenizer, args.gym_dir, task, seed),
      zero_shot_summary,
    ),
    (
      "init",
      "initial_prompts",
      "initial_prompt_summary",
      lambda task, seed: initial_prompts(
        model,
        params,
        tokenizer,
        args.gym_dir,
        task,
        seed,
        args.inits.split(","),
        forms[0],
        args.direction_calibration,
        args.direction_prompt_length,
      ),
      initial_prompt_summary,
    ),
  )
  for flag, key, summary_key, measure, summarize in measurements:
    tasks, seeds = getattr(args, f"{flag}_tasks"), getattr(args, f"{flag}_seeds")
    measure_tasks_and_seeds(report, key, summary_key, tasks, seeds, args.seed, measure, summarize)
  report["wall_s"] = round(time.time() - t0, 1)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  return report


if __name__ == "__main__":
  main()
