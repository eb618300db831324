"""Rank classification's "train_mean" calibration (config.downstream.calibration): each label's score minus
its mean score over the task's train inputs under the same prompt. Checked against the scores computed
alone (`label_log_likelihoods`), through the Scorer's batches, and end to end in the downstream grid."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from helpers_t5 import TINY_VOCAB, random_batch, tiny_t5
from mpt_jax import adapt, decode
from mpt_jax.data import batching, crossfit
from mpt_jax.model.loss import label_log_likelihoods

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


def _candidates(seed: int, num_labels: int = 3, width: int = 4) -> decode.Candidates:
  rng = np.random.default_rng(seed)
  ids = np.zeros((num_labels, width), np.int32)
  for c, n in enumerate((1, 2, 1)[:num_labels]):
    ids[c, :n] = rng.integers(3, TINY_VOCAB, n)
    ids[c, n] = 1
  mask = (ids > 0).astype(np.int32)
  return decode.Candidates(ids, mask, tuple(f"l{c}" for c in range(num_labels)), int(mask.sum(1).max()))


def test_label_bias_is_each_labels_mean_score_over_the_real_examples():
  scores = np.array([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]], [[0.0, 1.0], [2.0, 5.0], [4.0, 9.0]]])
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(decode.label_bias(scores, mask), [[2.0, -1.0], [2.0, 5.0]])
  np.testing.assert_allclose(decode.label_bias(scores[1]), [2.0, 5.0])


@pytest.mark.parametrize("direction", ["direct", "channel"])
def test_rank_classification_subtracts_the_label_bias_before_it_chooses(direction):
  model, params = tiny_t5("1.1", seed=3, num_layers=1, num_decoder_layers=1)
  candidates = _candidates(5)
  texts = random_batch(8, batch=6, input_length=7)
  prompt = jnp.asarray(np.random.default_rng(1).normal(size=(2, model.config.d_model)), jnp.float32)
  classify = decode.channel_rank_classify if direction == "channel" else decode.rank_classify
  scores = np.asarray(
    label_log_likelihoods(
      model,
      params,
      prompt,
      texts["input_ids"],
      texts["input_mask"],
      candidates.target_ids[:, : candidates.score_length],
      candidates.target_mask[:, : candidates.score_length],
      direction=direction,
    )
  )
  ours = decode.label_scores(
    model, params, texts["input_ids"], texts["input_mask"], prompt, candidates=candidates, direction=direction
  )
  np.testing.assert_allclose(np.asarray(ours), scores, rtol=1e-5, atol=1e-4)
  # A bias that makes every input choose the label it scores lowest: the decision must follow it.
  unbiased = np.argmax(scores, axis=1)
  bias = np.zeros(3, np.float32)
  target = int(np.argmin(np.bincount(unbiased, minlength=3)))
  bias[np.arange(3) != target] = 1e4
  for label_bias, expected in ((None, unbiased), (bias, np.full(6, target))):
    ids = classify(
      model,
      params,
      texts["input_ids"],
      texts["input_mask"],
      prompt,
      candidates=candidates,
      label_bias=label_bias,
    )
    np.testing.assert_array_equal(np.asarray(ids), candidates.target_ids[expected])
  # With the train-mean bias, the choice is the argmax of the centred scores.
  centred = scores - decode.label_bias(scores)
  ids = classify(
    model,
    params,
    texts["input_ids"],
    texts["input_mask"],
    prompt,
    candidates=candidates,
    label_bias=decode.label_bias(scores),
  )
  np.testing.assert_array_equal(np.asarray(ids), candidates.target_ids[np.argmax(centred, axis=1)])


def _split(seed: int, inputs: list[str], answers: list[str], tokenizer, split: str):
  raw = crossfit.Split(
    "toy", seed, split, f"toy_{seed}_{split}.tsv", tuple(inputs), tuple((a,) for a in answers)
  )
  return batching.tokenize_split(raw, tokenizer, batching.TextSpec(16, 8))


def test_the_scorer_biases_each_run_by_its_seeds_train_inputs_in_batches_that_do_not_divide_them(tmp_path):
  """Two runs (seeds 1 and 2) scored on their dev splits: each run's bias is its own seed's train mean,
  over 5 train inputs read in batches of 2 (the padding rows left out)."""
  from mpt_jax.model import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.load_tokenizer(helpers_t5.make_tokenizer_dir(tmp_path / "tok"))
  trains = {
    s: _split(s, [" ".join(["w"] * (i + s)) for i in range(5)], list("abaab"), tokenizer, "train")
    for s in (1, 2)
  }
  devs = [_split(s, ["x", "y y"], ["a", "b"], tokenizer, "dev") for s in (1, 2)]

  def label_scores(prompts, batch):  # a score per (run, input, label) that the test can recompute
    lengths = batch["input_mask"].sum(-1).astype(np.float64)  # [R, B]
    run = np.arange(2, dtype=np.float64)[:, None]
    return np.stack([lengths * (1 + run), -lengths * run], axis=-1)  # [R, B, 2]

  seen = []

  def predict(prompts, batch, label_bias=None):
    seen.append(label_bias)
    return np.zeros((*batch["input_ids"].shape[:2], 2), np.int32)

  scorer = adapt.Scorer(
    predict, tokenizer, "toy", batch_size=2, metric="ACC", calibration=(label_scores, trains)
  )
  scorer.predictions(None, devs)
  means = [trains[s].input_lengths.mean() for s in (1, 2)]
  assert means[0] != means[1] and len(seen) == 1  # the two dev examples fit one batch
  np.testing.assert_allclose(seen[0], [[means[0], 0.0], [2 * means[1], -means[1]]])
  # Without calibration, predict is called as before (no third argument).
  adapt.Scorer(lambda p, b: predict(p, b), tokenizer, "toy", batch_size=2, metric="ACC").predictions(
    None, devs
  )
  assert seen[-1] is None


def test_a_calibrated_grid_tests_each_seeds_prompt_with_its_train_mean_bias(tmp_path):
  """config.downstream.calibration="train_mean" through the downstream grid: the classification target's
  test score is its tested prompt's, decoded with the bias of its seed's train inputs under that prompt
  (recomputed here from the saved prompt); its fingerprint keys the calibration, the generation target's
  does not (rank-only key)."""
  from mpt_jax import config as config_lib, metrics, pipeline

  setting = tmp_path / "setting.json"
  targets = ["synth-sentiment_d", "synth-transform_copy"]
  setting.write_text(json.dumps({"source": ["synth-sentiment_a"], "target": targets}))
  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.gym, config.setting_file = "synthetic", str(setting)
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.downstream.decoding, config.downstream.calibration = "auto", "train_mean"
  config.seeds = (100,)
  workdir = str(tmp_path / "run")
  runtime = pipeline.build_runtime(config, workdir, upstream=False)
  data = pipeline.read_tasks(
    pipeline.resolve_data_dir(config, workdir), targets, config.seeds, ("train", "dev", "test")
  )
  (classification, generation) = pipeline.run_downstream(runtime, data, None)

  spec = batching.TextSpec(config.data.max_input_len, config.downstream.max_target_len)
  train, test = (
    batching.tokenize_split(data[targets[0]].split(100, s), runtime.tokenizer, spec)
    for s in ("train", "test")
  )
  generation_train = batching.tokenize_split(data[targets[1]].split(100, "train"), runtime.tokenizer, spec)
  assert runtime.task_scoring(generation_train).calibration_scores is None
  assert runtime.task_scoring(generation_train).candidates is None
  run = classification["runs"][0]
  task_dir = tmp_path / "run" / "downstream" / targets[0]
  prompt = np.load(task_dir / "prompts" / f"seed100_lr{run['best_lr']:g}.npy")
  candidates = decode.label_candidates(train)
  tb, eb = (batching.make_batch(s, np.arange(len(s))) for s in (train, test))
  bias = decode.label_bias(
    decode.label_scores(
      runtime.model,
      runtime.frozen_params,
      tb["input_ids"],
      tb["input_mask"],
      jnp.asarray(prompt),
      candidates=candidates,
      direction="direct",
    )
  )
  ids = decode.rank_classify(
    runtime.model,
    runtime.frozen_params,
    eb["input_ids"],
    eb["input_mask"],
    jnp.asarray(prompt),
    candidates=candidates,
    label_bias=bias,
  )
  predictions = runtime.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
  expected = metrics.evaluate(targets[0], predictions, [list(a) for a in test.answers])
  assert run["test_score"] == pytest.approx(expected, abs=1e-9)
  keys = [
    json.loads((tmp_path / "run" / "downstream" / t / "fingerprint.json").read_text())["keys"]
    for t in targets
  ]
  assert keys[0]["downstream.calibration"] == "train_mean" and "downstream.calibration" not in keys[1]
  assert generation["runs"][0]["test_score"] is not None
