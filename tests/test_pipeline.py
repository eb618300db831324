"""The pipeline: resumable upstream, the vmapped downstream grid, best-dev selection, one end-to-end run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from mpt_jax import adapt, algorithms, methods, optim, train
from mpt_jax.data import batching

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates (tests/helpers_t5.py)

PROMPT_LEN = 3
VOCAB = helpers_t5.TINY_VOCAB


def _episodes(step: int) -> dict:
  """A pure function of the step, like batching.EpisodeSampler: T=2 tasks, K=1, b=2, q=2."""
  support = helpers_t5.random_batch(1000 + step, batch=4, input_length=6, target_length=3)
  query = helpers_t5.random_batch(2000 + step, batch=4, input_length=6, target_length=3)
  shape = lambda b, lead: {k: v.reshape(*lead, *v.shape[1:]) for k, v in b.items()}
  return {"support": shape(support, (2, 1, 2)), "query": shape(query, (2, 2))}


@pytest.fixture(scope="module")
def tiny():
  model, params = helpers_t5.tiny_t5("1.1", dropout_rate=0.1)
  prompt0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (PROMPT_LEN, model.config.d_model)))
  return model, params, prompt0


@pytest.fixture(scope="module")
def maml_step(tiny):
  """One jitted MAML step (with dropout) shared by every run here, so it compiles once."""
  model, _, _ = tiny
  optimizer = optim.make_optimizer("adafactor", 0.5)
  loss_fn = algorithms.make_loss_fn(model, deterministic=False)
  return optimizer, algorithms.jit_step(methods.make_step("maml", loss_fn, optimizer, inner_lr=0.3))


def _upstream(tiny, maml_step, workdir, num_steps, fail_at=None, seed=7):
  _, params, prompt0 = tiny
  optimizer, step = maml_step

  def sample(s):
    if s == fail_at:
      raise KeyboardInterrupt(f"killed at step {s}")
    return _episodes(s)

  loop = train.LoopConfig(num_steps=num_steps, checkpoint_every=2, log_every=1, seed=seed)
  state = train.train_prompt(
    step, algorithms.init_state(prompt0, optimizer), params, sample, loop, str(workdir)
  )
  return state


@pytest.mark.compat
def test_killed_upstream_resumes_to_the_uninterrupted_result(tiny, maml_step, tmp_path):
  straight = _upstream(tiny, maml_step, tmp_path / "straight", num_steps=6)
  with pytest.raises(KeyboardInterrupt):
    _upstream(tiny, maml_step, tmp_path / "killed", num_steps=6, fail_at=5)  # last checkpoint: step 4
  assert sorted(os.listdir(tmp_path / "killed" / "checkpoints"))[-1] == "4"
  resumed = _upstream(tiny, maml_step, tmp_path / "killed", num_steps=6)
  assert int(resumed.step) == int(straight.step) == 6
  # Prompt, optimizer state and step: bitwise what the uninterrupted run has.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), resumed, straight)
  # Step 5 ran before the kill but after the last checkpoint (4), so it ran (and was logged) twice.
  logged = [
    json.loads(line)["step"]
    for line in open(tmp_path / "killed" / "logs" / "metrics.jsonl", encoding="utf-8")
  ]
  assert logged == [1, 2, 3, 4, 5, 5, 6]


def test_resume_refuses_a_checkpoint_of_another_seed(tiny, maml_step, tmp_path):
  _upstream(tiny, maml_step, tmp_path / "run", num_steps=2)
  with pytest.raises(ValueError, match="another seed"):
    _upstream(tiny, maml_step, tmp_path / "run", num_steps=4, seed=8)


class _Grid:
  """Two seeds x two learning rates on random train/dev batches; dev score = -dev loss (pure)."""

  def __init__(self, tiny):
    self.model, self.params, self.prompt0 = tiny
    self.runs = adapt.grid_runs([100, 13], [0.5, 0.2])
    self.train = {s: helpers_t5.random_batch(s, batch=2, input_length=6, target_length=3) for s in (100, 13)}
    self.dev = {
      s: helpers_t5.random_batch(s + 1, batch=3, input_length=6, target_length=3) for s in (100, 13)
    }
    self.loss = algorithms.make_loss_fn(self.model, deterministic=True)
    self.config = adapt.GridConfig(lrs=[0.5, 0.2], batch_size=2, num_steps=6, eval_every=2, eval_batch_size=3)
    # SGD: the comparison is about batching runs; Adafactor's update normalization would amplify the
    # last-bit differences of batched float32 reductions over several steps.
    self.optimizer = optim.make_optimizer("sgd", 0.5)
    self.step = adapt.make_grid_trainer(self.loss, self.optimizer)  # compiled once per number of runs
    self.score = jax.jit(jax.vmap(lambda p, b: -self.loss(p, self.params, b, None)))

  def sampler(self, runs):
    # the same batch every step: enough to compare grids; GridSampler has its own tests
    batch = {k: np.stack([self.train[r.seed][k] for r in runs]) for k in self.train[100]}
    return lambda step, runs: {k: v[runs] for k, v in batch.items()}

  def dev_scores(self, runs):
    dev = {k: np.stack([self.dev[r.seed][k] for r in runs]) for k in self.dev[100]}
    return lambda prompts: np.asarray(self.score(jnp.asarray(prompts), dev))

  def train_runs(self, runs, dev_scores=None, config=None, run_steps=None, **kwargs):
    """(best prompts, best scores, best steps, dev curve, last prompts) of the grid."""
    states = algorithms.init_grid_state(self.prompt0, self.optimizer, [r.learning_rate for r in runs])
    p = adapt.train_grid(
      self.step,
      states,
      self.params,
      self.sampler(runs),
      dev_scores or self.dev_scores(runs),
      config or self.config,
      run_steps=run_steps,
      **kwargs,
    )
    return p.best_prompts, p.best_scores, p.best_steps, p.dev_curve, p.last_prompts


@pytest.fixture(scope="module")
def grid(tiny):
  return _Grid(tiny)


@pytest.mark.compat
def test_vmapped_grid_equals_runs_one_by_one(grid):
  together = grid.train_runs(grid.runs)
  for i, run in enumerate(grid.runs):
    alone = grid.train_runs([run])
    # float32 matmuls batched over runs round differently from unbatched ones (~1e-6 per step); six
    # steps at lr 0.5 carry that to ~2e-5 in the prompt. A mixed-up run would differ at O(1).
    np.testing.assert_allclose(together[0][i], alone[0][0], rtol=1e-4, atol=1e-4)  # best prompt
    np.testing.assert_allclose(together[1][i], alone[1][0], rtol=1e-4)  # best dev score
    assert together[2][i] == alone[2][0]  # best step
  assert [step for step, _ in together[3]] == [2, 4, 6]  # no step-0 candidate by default


def _recording(peaks, default=0.5):
  """dev scores per evaluation (index -> scores [4]), and the prompts each evaluation saw."""
  seen = []

  def scores(prompts):
    seen.append(np.array(prompts))
    return np.asarray(peaks.get(len(seen) - 1, [default] * 4), np.float64)

  return scores, seen


def test_best_dev_selection_keeps_the_best_steps_prompt_not_the_last(grid):
  # dev scores peak at step 2 (evaluation 0) for runs 0 and 2, at step 4 for runs 1 and 3
  scores, seen = _recording({0: [1.0, 0.0, 1.0, 0.0], 1: [0.0, 1.0, 0.0, 1.0]})
  best_prompts, best_scores, best_steps, _, last_prompts = grid.train_runs(grid.runs, scores)
  assert best_steps.tolist() == [2, 4, 2, 4]
  assert best_scores.tolist() == [1.0] * 4
  for run, evaluation in enumerate([0, 1, 0, 1]):
    np.testing.assert_array_equal(best_prompts[run], seen[evaluation][run])
    assert not np.allclose(best_prompts[run], seen[-1][run])  # the last prompt moved on
  np.testing.assert_array_equal(last_prompts, seen[-1])  # what test_prompt="last" tests


def test_the_initial_prompt_is_a_candidate_only_when_asked(grid):
  import dataclasses

  # The initial prompt scores best of all; later ones worse, the first of them 0.2.
  peaks = {0: [0.9] * 4, 1: [0.2] * 4}
  scores, seen = _recording(peaks, default=0.1)
  with_step0 = dataclasses.replace(grid.config, step0_candidate=True)
  best_prompts, best_scores, best_steps, curve, _ = grid.train_runs(grid.runs, scores, with_step0)
  assert [step for step, _ in curve] == [0, 2, 4, 6]
  assert best_steps.tolist() == [0] * 4 and best_scores.tolist() == [0.9] * 4
  np.testing.assert_array_equal(best_prompts, np.broadcast_to(grid.prompt0, best_prompts.shape))

  # Off (the default, as the reference): step 0 is not even scored; the first evaluation is the first
  # candidate, whatever its score.
  scores, seen = _recording({0: [0.2] * 4}, default=0.1)
  best_prompts, best_scores, best_steps, curve, _ = grid.train_runs(grid.runs, scores)
  assert [step for step, _ in curve] == [2, 4, 6] and len(seen) == 3
  assert best_steps.tolist() == [2] * 4 and best_scores.tolist() == [0.2] * 4
  np.testing.assert_array_equal(best_prompts, seen[0])


def test_step_budget_counts_epochs_as_the_reference_loop():
  # The reference's wiki_qa: 32 train examples, batch 16, 1000 epochs -> "Global step 2000 ... epoch=999".
  assert adapt.step_budget(3000, 1000, train_size=32, batch_size=16) == 2000
  assert adapt.step_budget(3000, 1000, train_size=48, batch_size=16) == 3000  # 3 classes x 16
  assert adapt.step_budget(3000, 1000, train_size=33, batch_size=16) == 3000  # a short 3rd batch
  assert adapt.step_budget(3000, 1, train_size=33, batch_size=16) == 3
  assert adapt.step_budget(3000, 0, train_size=32, batch_size=16) == 3000  # 0: no cap
  with pytest.raises(ValueError, match="downstream.max_epochs=-1"):
    adapt.GridConfig(
      lrs=[0.5], batch_size=16, num_steps=3000, eval_every=50, eval_batch_size=32, max_epochs=-1
    )
  with pytest.raises(ValueError, match="downstream.test_prompt='best'"):
    adapt.GridConfig(
      lrs=[0.5], batch_size=16, num_steps=3000, eval_every=50, eval_batch_size=32, test_prompt="best"
    )


def test_runs_past_their_step_budget_are_not_candidates(grid):
  # Runs 1 and 3 may train 4 and 3 steps of the grid's 6 (e.g. seeds with fewer train examples).
  scores, seen = _recording({0: [0.1] * 4, 1: [0.2] * 4, 2: [0.3] * 4, 3: [0.9] * 4})
  best_prompts, best_scores, best_steps, curve, last_prompts = grid.train_runs(
    grid.runs, scores, run_steps=[6, 4, 6, 3]
  )
  assert [step for step, _ in curve] == [2, 3, 4, 6]  # every eval_every, and each budget's end
  assert best_steps.tolist() == [6, 4, 6, 3]
  assert best_scores.tolist() == [0.9, 0.3, 0.9, 0.2]
  assert curve[-1][1][1] != curve[-1][1][1] and curve[-1][1][3] != curve[-1][1][3]  # NaN: past budget
  for run, evaluation in enumerate([3, 2, 3, 1]):  # each run's last prompt: at its own budget
    np.testing.assert_array_equal(last_prompts[run], seen[evaluation][run])


def test_choose_best_runs_per_seed():
  runs = adapt.grid_runs([100, 13], [0.5, 0.4, 0.3])
  chosen = adapt.choose_best_runs(runs, [0.1, 0.7, 0.7, float("nan"), 0.2, 0.1])
  assert chosen == {100: 1, 13: 4}  # ties keep the first learning rate; NaN never wins


def test_grid_sampler_feeds_each_run_its_seeds_file(tmp_path):
  from mpt_jax.data import synthetic, crossfit
  import helpers_data

  synthetic.write_synthetic_gym(tmp_path / "gym", tasks=["synth-sentiment_d"])
  data = crossfit.read_crossfit(tmp_path / "gym", ["synth-sentiment_d"], seeds=(100, 13))
  tok = helpers_data.tiny_tokenizer(tmp_path / "tok")
  tokenized = batching.tokenize_tasks(data, tok, batching.TextSpec(32, 8))
  sampler = batching.GridSampler.create(
    {s: tokenized[("synth-sentiment_d", s, "train")] for s in (100, 13)}, [100, 100, 13, 13], batch_size=4
  )
  batch = sampler(0)
  assert batch["input_ids"].shape == (4, 4, 32)
  np.testing.assert_array_equal(batch["input_ids"][0], batch["input_ids"][1])  # same seed, same data
  assert not np.array_equal(batch["input_ids"][0], batch["input_ids"][2])


@pytest.mark.compat
def test_main_runs_a_setting_end_to_end_and_resumes(tmp_path):
  """`python -m mpt_jax.main` in-process on the synthetic gym with a tiny checkpoint: upstream (MTL),
  the downstream grid, results files; a second run finds everything done and recomputes nothing."""
  from mpt_jax import config as config_lib, pipeline, results
  from mpt_jax.model import hf, tokenizer as tokenizer_lib

  ckpt = tmp_path / "tiny_t5"
  helpers_t5.make_tokenizer_dir(ckpt)
  tokenizer = tokenizer_lib.load_tokenizer(ckpt)
  model, params = helpers_t5.tiny_t5("1.1", vocab_size=len(tokenizer))
  hf.save_checkpoint(ckpt, model.config, params, tokenizer)

  config = config_lib.base_config("mtl", "synth_mini", "tiny")
  config.gym, config.model, config.dropout_rate = "synthetic", str(ckpt), 0.0
  config.upstream.num_steps = 3
  config.downstream.max_epochs = 1  # 1 epoch of 32 examples in batches of 16 ends the 4-step runs early
  config.downstream.batch_size = 16
  workdir = tmp_path / "run"
  summary = pipeline.run(config, str(workdir))
  assert summary["method"] == "mtl" and list(summary["tasks"]) == ["synth-sentiment_d"]
  task = summary["tasks"]["synth-sentiment_d"]
  assert task["seeds"] == sorted(config.seeds) and len(task["test_scores"]) == 2
  assert all(0.0 <= s <= 1.0 for s in task["test_scores"])
  task_dir = workdir.parent / "gym_data" / "synthetic" / "synth-sentiment_d"
  train_sizes = {
    s: len(next(task_dir.glob(f"*_{s}_train.tsv")).read_text().splitlines()) for s in config.seeds
  }
  for run in task["runs"]:  # results.json records the steps each seed's chosen run trained
    expected = -(-train_sizes[run["seed"]] // config.downstream.batch_size)
    assert expected < config.downstream.num_steps and run["steps"] == expected
    assert run["test_prompt"] == "best_dev" and run["tested_step"] == run["best_step"]
  for name in (
    "results.json",
    "results.md",
    "results.csv",
    "results.png",
    "run_record.json",
    "upstream/prompt.npy",
    "upstream/prompt.json",
    "upstream/logs/metrics.jsonl",
    "downstream/synth-sentiment_d/results.json",
    "downstream/synth-sentiment_d/dev_curve.json",
    "downstream/synth-sentiment_d/prompts/seed100_lr0.5.npy",
  ):
    assert (workdir / name).exists(), name
  first = (workdir / "downstream/synth-sentiment_d/results.json").stat().st_mtime_ns
  again = pipeline.run(config, str(workdir))
  assert (workdir / "downstream/synth-sentiment_d/results.json").stat().st_mtime_ns == first
  assert again["tasks"]["synth-sentiment_d"]["test_scores"] == task["test_scores"]
  assert len(json.load(open(workdir / "run_record.json"))) == 2
  assert results.load_results(workdir / "results.json")["average"] == summary["average"]


def test_scorer_decodes_as_the_study_without_cleaning_up_spaces(tmp_path):
  import helpers_data
  from mpt_jax.data import crossfit

  tokenizer = helpers_data.tiny_tokenizer(tmp_path / "tok")
  gold = "paris , france ."
  # What a checkpoint's tokenizer_config.json may set; transformers then cleans " ," to "," by default.
  tokenizer.clean_up_tokenization_spaces = True
  ids = tokenizer(gold).input_ids
  assert tokenizer.batch_decode([ids], skip_special_tokens=True) == ["paris, france."]
  split = crossfit.Split("qa_toy", 100, "dev", "qa_toy_3_100_dev.tsv", ("where?",), ((gold,),))
  tokenized = batching.tokenize_split(split, tokenizer, batching.TextSpec(16, 16))
  width = 16

  def predict(prompts, batch):  # every row "generates" the gold's tokens
    out = np.zeros((*batch["input_ids"].shape[:2], width), np.int32)
    out[..., : len(ids)] = ids
    return out

  scorer = adapt.Scorer(predict, tokenizer, "qa_toy", batch_size=2, metric="ACC")
  assert scorer.predictions(None, [tokenized]) == [[gold]]
  assert scorer.scores(None, [tokenized]).tolist() == [1.0]  # ACC compares the strings as they are


def test_target_files_keep_lines_without_an_answer_where_their_metric_can_score_them(tmp_path):
  import warnings

  from mpt_jax import pipeline

  for task in ("squad-no_context", "ag_news"):  # EM; Classification-F1 (scores the first gold)
    (tmp_path / task).mkdir()
    for split in ("train", "dev", "test"):
      empty = "q9\t\n" if split != "train" else ""
      (tmp_path / task / f"{task}_16_100_{split}.tsv").write_text(f"q1\ta1\nq2\ta2\n{empty}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data = pipeline.read_tasks(
      str(tmp_path), ["squad-no_context"], [100], ("train", "dev", "test"), keep_empty_answers=("dev", "test")
    )
    pipeline.check_scorable(data)  # EM scores them 0, as the reference
    assert data["squad-no_context"].split(100, "test").answers == (("a1",), ("a2",), ())
    data = pipeline.read_tasks(
      str(tmp_path), ["ag_news"], [100], ("train", "dev", "test"), keep_empty_answers=("dev", "test")
    )
  with pytest.raises(
    ValueError,
    match=r"ag_news_16_100_dev.tsv: 1 line\(s\) without an answer, which "
    r"Classification-F1 \(a metric of the first gold\) cannot score",
  ):
    pipeline.check_scorable(data)


def test_the_runtime_places_the_frozen_weights_on_every_device_once(tmp_path):
  """build_runtime: the weights both stages use are replicated over the whole mesh (2 simulated
  devices), upstream's step is the data-parallel one, and nothing is compiled until first called."""
  import jax

  from mpt_jax import config as config_lib, pipeline

  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  runtime = pipeline.build_runtime(config, str(tmp_path / "run"), upstream=True)
  assert runtime.mesh.size == jax.device_count() == 2
  for leaf in jax.tree.leaves(runtime.frozen_params):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
  assert runtime.upstream_step._cache_size() == 0 and runtime.grid_step._cache_size() == 0
  assert runtime.cache_dir == str(tmp_path / "run" / "cache")  # as config.py says
  config.num_devices = 1
  assert pipeline.build_runtime(config, str(tmp_path / "run"), upstream=False).mesh.size == 1


def test_the_channel_direction_trains_and_scores_classification_tasks_as_p_input_given_label(tmp_path):
  """config.data.direction="channel" on the synthetic gym, with a classification and a generation source:
  upstream episodes hold the classification task in the channel form (its label in, its input out) and the
  generation task direct, in one shape; the target's predictor is channel rank classification; the whole
  run (FoMAML, then the downstream grid) ends with scores."""
  from mpt_jax import config as config_lib, decode, pipeline, scoring

  setting = tmp_path / "setting.json"
  sources = ["synth-sentiment_a", "synth-transform_copy"]
  setting.write_text(json.dumps({"source": sources, "target": ["synth-sentiment_d"]}))
  config = config_lib.base_config("fomaml", "synth_mini", "tiny")
  config.gym, config.dropout_rate, config.setting_file = "synthetic", 0.0, str(setting)
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.data.direction, config.downstream.decoding = "channel", "auto"
  workdir = str(tmp_path / "run")
  data_dir = pipeline.resolve_data_dir(config, workdir)
  runtime = pipeline.build_runtime(config, workdir, upstream=True)
  tokenizer = runtime.tokenizer
  assert [scoring.task_direction(config, t) for t in sources] == ["channel", "direct"]

  source_data = pipeline.read_tasks(data_dir, sources, config.seeds, ("train", "dev"))
  sampler, _ = pipeline.upstream_sampler(config, source_data, tokenizer, str(tmp_path / "cache"))
  shapes = set()
  for meta_task in sampler.meta_tasks:
    split, raw = meta_task.support, source_data[meta_task.task].split(meta_task.seed, "train")
    shapes.add((split.lengths, meta_task.query.lengths))
    first_input, first_target = (
      tokenizer.decode(ids[0], skip_special_tokens=True) for ids in (split.input_ids, split.target_ids)
    )
    text = config.data.input_template.format(task=meta_task.task, input=raw.inputs[0])
    # The input and the answer as the direct form tokenizes them (cut at their lengths).
    as_input, as_answer = (
      tokenizer.decode(tokenizer(t, truncation=True, max_length=n).input_ids, skip_special_tokens=True)
      for t, n in ((text, config.data.max_input_len), (raw.answers[0][0], config.upstream.max_target_len))
    )
    if meta_task.task == "synth-sentiment_a":  # channel: the label is read, the input is the target
      assert (first_input, first_target) == (as_answer, as_input)
    else:
      assert (first_input, first_target) == (as_input, as_answer)
  assert len(shapes) == 1

  target = pipeline.read_tasks(data_dir, ["synth-sentiment_d"], [100], ("train", "test"))["synth-sentiment_d"]
  spec = batching.TextSpec(config.data.max_input_len, config.downstream.max_target_len)
  train, test = (batching.tokenize_split(target.split(100, s), tokenizer, spec) for s in ("train", "test"))
  prompt = np.random.default_rng(0).normal(size=(1, config.prompt.length, runtime.model.config.d_model))
  batch = batching.make_batch(test, np.arange(min(8, len(test)))[None])
  predicted = runtime.task_scoring(train).predict(prompt.astype(np.float32), batch)
  expected = decode.channel_rank_classify(
    runtime.model,
    runtime.frozen_params,
    batch["input_ids"][0],
    batch["input_mask"][0],
    jnp.asarray(prompt[0], jnp.float32),
    candidates=decode.label_candidates(train),
  )
  np.testing.assert_array_equal(predicted[0], np.asarray(expected))

  summary = pipeline.run(config, workdir)
  scores = summary["tasks"]["synth-sentiment_d"]["test_scores"]
  assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("direction", ["direct", "channel"])
def test_a_label_choice_objective_trains_classification_targets_on_their_label_set(tmp_path, direction):
  """config.downstream.objective="likelihood+label_choice": a classification target's grid trains with
  the label-choice step of its direction and its train labels in every batch; a generation target keeps
  the token cross-entropy's step; both grids end with scores (trained in the channel direction only, to
  keep the suite fast)."""
  from mpt_jax import config as config_lib, decode, pipeline

  setting = tmp_path / "setting.json"
  targets = ["synth-sentiment_d", "synth-transform_copy"]
  setting.write_text(json.dumps({"source": ["synth-sentiment_a"], "target": targets}))
  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.gym, config.setting_file = "synthetic", str(setting)
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.data.direction, config.downstream.decoding = direction, "auto"
  config.downstream.objective = "likelihood+label_choice"
  workdir = str(tmp_path / "run")
  runtime = pipeline.build_runtime(config, workdir, upstream=False)
  choice_grid_steps = {d: s.choice_grid_step for d, s in runtime.scorings.items() if s.choice_grid_step}
  assert set(choice_grid_steps) == {"direct", "channel"}
  data = pipeline.read_tasks(pipeline.resolve_data_dir(config, workdir), targets, [100], ("train",))
  spec = batching.TextSpec(config.data.max_input_len, config.downstream.max_target_len)
  classification, generation = (
    batching.tokenize_split(data[t].split(100, "train"), runtime.tokenizer, spec) for t in targets
  )
  classification_scoring = runtime.task_scoring(classification)
  step, label_set = classification_scoring.grid_step, classification_scoring.label_set
  assert step is choice_grid_steps[direction]
  candidates = decode.label_candidates(classification)
  np.testing.assert_array_equal(label_set[0], candidates.target_ids)
  generation_scoring = runtime.task_scoring(generation)
  assert (generation_scoring.grid_step, generation_scoring.label_set) == (runtime.grid_step, None)

  assert runtime.grid_step._cache_size() == step._cache_size() == 0
  if direction == "direct":  # the direct label-choice step is tested in tests/test_label_choice.py
    return
  data = pipeline.read_tasks(
    pipeline.resolve_data_dir(config, workdir), targets, config.seeds, ("train", "dev", "test")
  )
  summaries = pipeline.run_downstream(runtime, data, None)
  for summary in summaries:
    assert len(summary["test_scores"]) == 2 and all(0.0 <= s <= 1.0 for s in summary["test_scores"])
  # Each grid trained with its own step: the classification target's label choice, the generation
  # target's token cross-entropy.
  assert step._cache_size() > 0 and runtime.grid_step._cache_size() > 0
  assert choice_grid_steps["channel" if direction == "direct" else "direct"]._cache_size() == 0
