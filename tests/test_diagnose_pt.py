"""experiments/diagnose_pt.py's ceilings (measurement 6): the linear probe, fine-tuning and their summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mpt_jax.model.hf import load_pretrained

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("diagnose_pt", REPO / "experiments" / "diagnose_pt.py")
diagnose_pt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diagnose_pt)


EVAL_PER_LABEL = 6  # dev and test examples kept per label (tests/test_diagnose_pt.py's cut of the gym)


@pytest.fixture(scope="module")
def gym(tmp_path_factory) -> Path:
  """The shipped gym's two tasks these tests read (seed 100), their dev and test files cut to the first
  EVAL_PER_LABEL examples of each label (as balanced as the whole files; train files whole): scoring
  the 120-example test files in every form was most of these tests' time."""
  gym = tmp_path_factory.mktemp("gym")
  for name in ("wordnet_gym_info.json", "wordnet_task_metrics.json", "wordnet_settings.json"):
    (gym / name).write_bytes((diagnose_pt.GYM_DIR / name).read_bytes())
  for task in ("wn-antonym_pair", "wn-noun_category_living"):
    (gym / task).mkdir()
    for path in sorted((diagnose_pt.GYM_DIR / task).glob(f"{task}_*_100_*.tsv")):
      lines = path.read_text().splitlines(keepends=True)
      if not path.name.endswith("_train.tsv"):
        seen: dict[str, int] = {}
        kept = []
        for line in lines:
          label = line.rstrip("\n").split("\t")[1]
          seen[label] = seen.get(label, 0) + 1
          if seen[label] <= EVAL_PER_LABEL:
            kept.append(line)
        lines = kept
      (gym / task / path.name).write_text("".join(lines))
  return gym


def test_ceiling_summary_averages_over_seeds_then_over_tasks():
  def row(task, constant, probe, tuned):
    return {
      "task": task,
      "constant_answer": constant,
      "linear_probe": {"test_score": probe},
      "fine_tune": {"test_score": tuned},
    }

  rows = [row("a", 0.1, 0.3, 0.5), row("a", 0.1, 0.5, 0.7), row("b", 0.5, 0.6, 0.6)]
  summary = diagnose_pt.ceiling_summary(rows)
  assert summary["per_task"]["a"] == {"constant": 10.0, "linear_probe": 40.0, "fine_tune": 60.0, "seeds": 2}
  assert summary["per_task"]["b"]["seeds"] == 1
  assert summary["average"] == {"constant": 30.0, "linear_probe": 50.0, "fine_tune": 60.0}


def test_ceilings_of_the_shipped_model_on_a_gym_task(gym):
  """Short runs on the real asset and gym: the probe separates its 80 train examples, fine-tuning lowers
  the loss, and the constant answer scores what macro-F1 gives a majority guess over 5 balanced classes."""
  model, params, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  row = diagnose_pt.ceilings(
    model,
    params,
    tokenizer,
    gym,
    "wn-noun_category_living",
    100,
    probe_steps=200,
    fine_tune_steps=12,
  )
  assert row["metric"] == "Classification-F1" and row["train_examples"] == 80
  # One class predicted everywhere: F1 2 * 0.2 / 1.2 on it, 0 on the other four.
  assert row["constant_answer"] == pytest.approx(2 * 0.2 / 1.2 / 5)
  assert row["linear_probe"]["train_accuracy"] == 1.0
  curve = np.array(row["fine_tune"]["loss_curve"])
  assert curve[-1, 1] < 0.5 * curve[0, 1]
  for score in (row["linear_probe"]["test_score"], row["fine_tune"]["test_score"]):
    assert 0.0 <= score <= 1.0


def test_direction_summary_averages_each_direction_over_seeds_then_tasks():
  def row(task, constant, direct, channel):
    return {
      "task": task,
      "constant_answer": constant,
      "direct": {"test_score": direct, "zero_shot_no_prompt": constant},
      "channel": {"test_score": channel, "zero_shot_no_prompt": 0.5 * channel},
    }

  summary = diagnose_pt.direction_summary(
    [row("a", 0.1, 0.2, 0.4), row("a", 0.1, 0.4, 0.6), row("b", 0.5, 0.5, 0.8)]
  )
  assert summary["per_task"]["a"] == {
    "constant": 10.0,
    "direct_pt": 30.0,
    "direct_zero_shot": 10.0,
    "channel_pt": 50.0,
    "channel_zero_shot": 25.0,
    "seeds": 2,
  }
  assert summary["average"]["channel_pt"] == 65.0 and summary["average"]["direct_pt"] == 40.0


def test_direct_and_channel_prompt_tuning_of_the_shipped_model_on_a_gym_task(gym):
  """A short grid on the real asset and gym: both directions train, pick a best-dev (lr, step) among the
  evaluated ones and score the test file; the constant answer of a balanced 2-label ACC task is 0.5."""
  model, params, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  row = diagnose_pt.directions(
    model, params, tokenizer, gym, "wn-antonym_pair", 100, steps=4, eval_every=2, lrs=(0.5,)
  )
  assert row["metric"] == "ACC" and row["constant_answer"] == 0.5
  for direction in diagnose_pt.DIRECTIONS:
    result = row[direction]
    assert result["direction"] == direction and result["best_lr"] == 0.5 and result["best_step"] in (2, 4)
    assert np.isfinite(result["train_loss_at_best"])
    for key in ("zero_shot_no_prompt", "initial_prompt", "dev_score", "test_score"):
      assert 0.0 <= result[key] <= 1.0
  # The channel form's loss is over the input's tokens, the direct form's over the label's: other numbers,
  # not one computation twice (which would agree to float32 rounding, far inside 1e-3). How far apart
  # they are is an outcome of training (9% on one CPU, 10% on another), so it is not asserted.
  assert row["channel"]["train_loss_at_best"] != pytest.approx(row["direct"]["train_loss_at_best"], rel=1e-3)
  # The label-choice objective: a cross-entropy over the task's 2 labels, far below the channel form's
  # token cross-entropy over the input.
  choice = diagnose_pt.directions(
    model,
    params,
    tokenizer,
    gym,
    "wn-antonym_pair",
    100,
    forms=("channel",),
    steps=4,
    eval_every=2,
    lrs=(0.5,),
    objective="label_choice",
  )["channel"]
  assert choice["objective"] == "label_choice" and 0.0 <= choice["test_score"] <= 1.0
  assert choice["train_loss_at_best"] < 3.0 < row["channel"]["train_loss_at_best"]
  with pytest.raises(ValueError, match="direction 'sideways'"):
    diagnose_pt.prompt_tune_direction(model, params, tokenizer, {}, "sideways", 100)
  with pytest.raises(ValueError, match="calibration 'median'"):
    diagnose_pt.prompt_tune_direction(model, params, tokenizer, {}, "channel", 100, calibration="median")


def test_calibrated_rank_predictions_take_each_labels_train_mean_off_its_scores(gym):
  """--direction_calibration=train_mean: each dev input's label is the argmax of its scores minus the
  labels' mean scores over the train inputs (the zero-shot model, both directions)."""
  from mpt_jax import decode
  from mpt_jax.data import batching, crossfit

  model, params, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  task = "wn-noun_category_living"
  raw = crossfit.read_crossfit(gym, [task], [100], ["train", "dev"])[task].splits
  train, dev = (
    batching.tokenize_split(raw[(100, s)], tokenizer, diagnose_pt.CHANNEL_SPEC) for s in ("train", "dev")
  )
  candidates = decode.label_candidates(train)

  def scores(split, direction):
    b = batching.make_batch(split, np.arange(len(split)))
    return np.asarray(
      decode.label_scores(
        model, params, b["input_ids"], b["input_mask"], None, candidates=candidates, direction=direction
      )
    )

  for direction in diagnose_pt.DIRECTIONS:
    centred = scores(dev, direction) - scores(train, direction).mean(axis=0)
    expected = [candidates.texts[i] for i in np.argmax(centred, axis=1)]
    got = diagnose_pt.rank_predictions(model, params, tokenizer, dev, candidates, None, direction, train)
    assert got == expected
    raw_choice = [candidates.texts[i] for i in np.argmax(scores(dev, direction), axis=1)]
    if direction == "channel":  # uncalibrated, the channel form gives most inputs one label (README)
      assert len(set(raw_choice)) < len(set(got))


def test_source_tuning_pools_every_source_train_file_of_the_setting_and_no_target():
  import json

  spec = importlib.util.spec_from_file_location(
    "tune_on_sources", REPO / "experiments" / "tune_on_sources.py"
  )
  tune_on_sources = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tune_on_sources)
  _, _, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  gym = diagnose_pt.GYM_DIR
  setting = json.loads((gym / "wordnet_settings.json").read_text())["wn_cls2cls"]
  pool = tune_on_sources.source_pool(gym, "wn_cls2cls", tokenizer)

  def lines(task):
    return [
      line.split("\t")[0]
      for f in sorted((gym / task).glob("*_train.tsv"))
      for line in f.read_text().splitlines()
    ]

  template = diagnose_pt.SPEC.input_template

  def ids(task):  # as the pool holds them: formatted, token ids, EOS last, cut at the spec's input length
    cut = diagnose_pt.SPEC.max_input_len
    texts = [template.format(task=task, input=x) for x in lines(task)]
    return {tuple(x[: cut - 1] + [1] if len(x) > cut else x) for x in tokenizer(texts)["input_ids"]}

  assert len(pool) == sum(len(lines(task)) for task in setting["source"]) == 3520
  pooled = {tuple(int(t) for t in row if t) for row in pool.input_ids}
  assert pooled == set().union(*(ids(task) for task in setting["source"]))  # exactly the source examples
  for task in setting["target"]:  # no target task's example, in any seed's train file
    assert not pooled & ids(task), task
  with pytest.raises(SystemExit, match="wordnet_settings.json"):
    tune_on_sources.source_pool(gym, "wn_nosuch", tokenizer)


def test_zero_shot_rank_classification_reports_both_directions_raw_and_calibrated(gym):
  """Measurement 8 on the real asset and gym: four forms, each with dev and test scores and a count of the
  test inputs per predicted label (they add up to the test file), and the summary over seeds and tasks."""
  model, params, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  row = diagnose_pt.zero_shot(model, params, tokenizer, gym, "wn-antonym_pair", 100)
  forms = [f"{d}/{c}" for d in diagnose_pt.DIRECTIONS for c in ("none", "train_mean")]
  assert [k for k in row if "/" in k] == forms
  for form in forms:
    assert 0.0 <= row[form]["dev_score"] <= 1.0 and 0.0 <= row[form]["test_score"] <= 1.0
    assert sum(row[form]["test_label_counts"].values()) == 2 * EVAL_PER_LABEL
    assert set(row[form]["test_label_counts"]) <= {"opposite", "similar"}
  summary = diagnose_pt.zero_shot_summary([row])
  assert summary["average"]["channel/train_mean/test"] == pytest.approx(
    100 * row["channel/train_mean"]["test_score"], abs=0.06
  )


def test_initial_prompts_score_each_untrained_init_and_no_prompt_as_zero_shot(gym):
  """Measurement 9 on the real asset and gym: "none" is measurement 8's zero-shot score in the same form;
  "token:</s>" scores a prompt of EOS rows, which differs from no prompt; an unknown init is refused."""
  model, params, tokenizer = load_pretrained(str(REPO / "assets" / "small_t5"))
  task, seed = "wn-antonym_pair", 100
  inits = ["none", "task_names", "token:</s>"]
  row = diagnose_pt.initial_prompts(model, params, tokenizer, gym, task, seed, inits, "channel", "train_mean")
  zero = diagnose_pt.zero_shot(model, params, tokenizer, gym, task, seed)["channel/train_mean"]
  assert row["none"] == {"dev_score": zero["dev_score"], "test_score": zero["test_score"]}
  embedding = np.asarray(params["shared"]["embedding"], np.float32)
  eos_prompt = diagnose_pt.initial_prompt_of("token:</s>", embedding, tokenizer, task, seed, 16)
  np.testing.assert_array_equal(eos_prompt, np.tile(embedding[1], (16, 1)))
  for init in inits:
    assert 0.0 <= row[init]["dev_score"] <= 1.0 and 0.0 <= row[init]["test_score"] <= 1.0
  summary = diagnose_pt.initial_prompt_summary([row])
  assert summary["average"]["token:</s>/test"] == pytest.approx(
    100 * row["token:</s>"]["test_score"], abs=0.06
  )
  with pytest.raises(ValueError, match="'zeros' is not one of none"):
    diagnose_pt.initial_prompt_of("zeros", embedding, tokenizer, task, seed, 16)
