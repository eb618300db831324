"""Tokenization, its cache, and the batch samplers, on the hand-written fixtures and a tiny T5 tokenizer."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from mpt_jax.data import batching, crossfit
from mpt_jax.data.batching import EOS_ID, PAD_ID, TextSpec
from tests.helpers_data import CROSSFIT_FIXTURES, CountingTokenizer, tiny_tokenizer

SPEC = TextSpec(max_input_len=24, max_target_len=6)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def data():
  tasks = crossfit.read_crossfit(CROSSFIT_FIXTURES, ["sentiment_toy"])
  tasks.update(crossfit.read_crossfit(CROSSFIT_FIXTURES, ["qa_toy"], seeds=[100, 13]))
  return tasks


@pytest.fixture(scope="module")
def tokenized(data, tokenizer):
  return batching.tokenize_tasks(data, tokenizer, SPEC)


def _reference_ids(tokenizer, text: str, max_length: int) -> list[int]:
  """What the HF tokenizer itself gives with its EOS and its truncation."""
  return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]


def _row(ids: np.ndarray, mask: np.ndarray) -> list[int]:
  return ids[mask.astype(bool)].tolist()


def test_inputs_are_task_prefixed_truncated_and_eos_terminated(data, tokenizer, tokenized):
  for seed, split in [(100, "train"), (100, "test")]:
    source = data["qa_toy"].split(seed, split)
    ids = tokenized[("qa_toy", seed, split)]
    batch = batching.make_batch(ids, np.arange(len(source)))
    for i, text in enumerate(source.inputs):
      expected = _reference_ids(tokenizer, " [qa_toy] " + text, SPEC.max_input_len)
      assert _row(batch["input_ids"][i], batch["input_mask"][i]) == expected
  # The long test input is cut to the input length with EOS kept last.
  test = tokenized[("qa_toy", 100, "test")]
  assert test.input_lengths[1] == SPEC.max_input_len and test.input_ids[1, -1] == EOS_ID
  assert test.num_truncated >= 1
  assert tokenizer.decode(test.input_ids[0]).startswith("[qa_toy] question: who painted")


def test_every_gold_is_tokenized_with_eos_and_padded(data, tokenizer, tokenized):
  source = data["qa_toy"].split(100, "train")
  ids = tokenized[("qa_toy", 100, "train")]
  assert ids.num_golds.tolist() == [2, 1, 3]
  for i, golds in enumerate(source.answers):
    for j, gold in enumerate(golds):
      batch = batching.make_batch(ids, np.array([i]), np.array([j]))
      assert _row(batch["target_ids"][0], batch["target_mask"][0]) == _reference_ids(
        tokenizer, gold, SPEC.max_target_len
      )
  assert ids.answers == source.answers  # the text of every gold stays for evaluation


def test_masks_mark_exactly_the_real_tokens(tokenized):
  ids = tokenized[("sentiment_toy", 13, "dev")]
  batch = batching.make_batch(ids, np.arange(len(ids)))
  assert batch["input_ids"].shape == (4, SPEC.max_input_len)
  assert batch["target_ids"].shape == (4, SPEC.max_target_len)
  for key in ("input", "target"):
    token_ids, mask = batch[f"{key}_ids"], batch[f"{key}_mask"]
    assert token_ids.dtype == np.int32 and mask.dtype == np.int32
    lengths = mask.sum(-1)
    # Real tokens first (none of them pad), then pads only; the last real token is EOS.
    assert np.all(mask == (np.arange(mask.shape[1]) < lengths[:, None]))
    assert np.all(token_ids[mask == 0] == PAD_ID) and np.all(token_ids[mask == 1] != PAD_ID)
    assert np.all(token_ids[np.arange(len(lengths)), lengths - 1] == EOS_ID)


def test_the_input_template_is_configurable(data, tokenizer):
  spec = dataclasses.replace(SPEC, input_template="{input} ({task})")
  ids = batching.tokenize_split(data["sentiment_toy"].split(100, "train"), tokenizer, spec)
  text = "review: the food was wonderful (sentiment_toy)"
  assert ids.input_ids[0, : ids.input_lengths[0]].tolist() == _reference_ids(tokenizer, text, 24)
  with pytest.raises(ValueError, match="only the fields"):
    TextSpec(input_template="[{name}] {input}")


def test_a_second_tokenization_reads_the_cache(data, tokenizer, tmp_path):
  split = data["qa_toy"].split(100, "train")
  counting = CountingTokenizer(tokenizer)
  first = batching.tokenize_split(split, counting, SPEC, cache_dir=tmp_path)
  assert counting.calls == 2  # inputs, then golds
  tokenizer("a call that sets truncation state", truncation=True, max_length=3)  # not a new tokenizer
  second = batching.tokenize_split(split, counting, SPEC, cache_dir=tmp_path)
  assert counting.calls == 2
  for field in ("input_ids", "input_lengths", "target_ids", "target_lengths", "gold_offsets"):
    np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
  assert second.num_truncated == first.num_truncated and second.answers == first.answers
  # Another length, or other file content, is another key.
  batching.tokenize_split(split, counting, dataclasses.replace(SPEC, max_target_len=8), tmp_path)
  assert counting.calls == 4
  edited = dataclasses.replace(split, inputs=(split.inputs[0] + " !",) + split.inputs[1:])
  batching.tokenize_split(edited, counting, SPEC, cache_dir=tmp_path)
  assert counting.calls == 6
  assert len(list((tmp_path / "qa_toy").iterdir())) == 3


def test_cache_files_are_datasets_arrow_files(data, tokenizer, tmp_path):
  import datasets

  ids = batching.tokenize_split(data["qa_toy"].split(13, "dev"), tokenizer, SPEC, cache_dir=tmp_path)
  (path,) = (tmp_path / "qa_toy").iterdir()
  table = datasets.Dataset.from_file(str(path))
  assert table.num_rows == 3
  for i, row in enumerate(table):
    assert row["input_ids"] == ids.input_ids[i, : ids.input_lengths[i]].tolist()
    assert len(row["target_ids"]) == len(ids.answers[i])


def test_the_channel_form_swaps_each_input_with_its_label(data, tokenized):
  direct = tokenized[("sentiment_toy", 100, "train")]
  channel = batching.channel_form(direct)
  direct_batch = batching.make_batch(direct, np.arange(len(direct)))
  channel_batch = batching.make_batch(channel, np.arange(len(direct)))
  for side, other in (("input", "target"), ("target", "input")):
    np.testing.assert_array_equal(channel_batch[f"{side}_ids"], direct_batch[f"{other}_ids"])
    np.testing.assert_array_equal(channel_batch[f"{side}_mask"], direct_batch[f"{other}_mask"])
  assert channel.answers == direct.answers and channel.lengths == direct.lengths[::-1]
  # Padded to one shape with direct splits (an upstream pool of both forms); the batch's rows keep their tokens.
  padded = batching.pad_lengths(channel, 30, 30)
  assert padded.lengths == (30, 30)
  padded_batch = batching.make_batch(padded, np.arange(len(direct)))
  for key in ("input", "target"):
    width = channel_batch[f"{key}_ids"].shape[1]
    np.testing.assert_array_equal(padded_batch[f"{key}_ids"][:, :width], channel_batch[f"{key}_ids"])
    assert (
      not padded_batch[f"{key}_ids"][:, width:].any() and not padded_batch[f"{key}_mask"][:, width:].any()
    )
  with pytest.raises(ValueError, match="cannot cut"):
    batching.pad_lengths(channel, 4, 30)
  # A generation split with several golds per example has no single label to condition on.
  with pytest.raises(ValueError, match="qa_toy.*exactly one gold.*example 0 has 2"):
    batching.channel_form(tokenized[("qa_toy", 100, "train")])


def _rows_of(ids: batching.TokenizedSplit) -> set[tuple[int, ...]]:
  return {tuple(r) for r in ids.input_ids}


def _sampler(tokenized, **kwargs):
  tasks = batching.meta_tasks(tokenized, ["sentiment_toy", "qa_toy"], [100, 13])
  defaults = dict(tasks_per_step=2, inner_steps=3, inner_batch_size=2, query_size=3, seed=7)
  return batching.EpisodeSampler(tasks, **{**defaults, **kwargs})


def test_episode_shapes_and_sources(tokenized):
  sampler = _sampler(tokenized)
  episode = sampler(5)
  assert episode["support"]["input_ids"].shape == (2, 3, 2, SPEC.max_input_len)
  assert episode["support"]["target_mask"].shape == (2, 3, 2, SPEC.max_target_len)
  assert episode["query"]["input_ids"].shape == (2, 3, SPEC.max_input_len)
  chosen = sampler.task_indices(5)
  assert len(set(chosen.tolist())) == 2  # distinct meta-tasks within a step
  for t, index in enumerate(chosen):
    task = sampler.meta_tasks[index]
    support = {tuple(r) for r in episode["support"]["input_ids"][t].reshape(-1, SPEC.max_input_len)}
    query = {tuple(r) for r in episode["query"]["input_ids"][t]}
    assert support <= _rows_of(task.support) and query <= _rows_of(task.query)


def test_episodes_are_a_pure_function_of_seed_and_step(tokenized):
  sampler = _sampler(tokenized)
  resumed = _sampler(tokenized)  # a fresh sampler, as after a restart
  for step in (0, 5, 1234):
    a, b = sampler(step), resumed(step)
    for part in ("support", "query"):
      for key in batching.BATCH_KEYS:
        np.testing.assert_array_equal(a[part][key], b[part][key])
  distinct = {sampler(step)["support"]["input_ids"].tobytes() for step in range(10)}
  assert len(distinct) == 10
  other_seed = _sampler(tokenized, seed=8)
  assert other_seed(5)["support"]["input_ids"].tobytes() != sampler(5)["support"]["input_ids"].tobytes()


def test_reptile_episodes_have_no_query_and_reuse_small_files_evenly(tokenized):
  # 4 train examples, 10 support examples: whole passes over the file (each seen 2 or 3 times).
  tasks = batching.meta_tasks(tokenized, ["sentiment_toy"], [42], with_query=False)
  sampler = batching.EpisodeSampler(
    tasks, tasks_per_step=1, inner_steps=5, inner_batch_size=2, query_size=None
  )
  episode = sampler(3)
  assert set(episode) == {"support"}
  rows = [tuple(r) for r in episode["support"]["input_ids"].reshape(-1, SPEC.max_input_len)]
  counts = collections.Counter(rows)
  assert set(counts) == _rows_of(tasks[0].support) and sorted(counts.values()) == [2, 2, 3, 3]
  # When the file is big enough, no example repeats.
  small = batching.EpisodeSampler(tasks, tasks_per_step=1, inner_steps=2, inner_batch_size=2, query_size=None)
  rows = small(3)["support"]["input_ids"].reshape(-1, SPEC.max_input_len)
  assert len({tuple(r) for r in rows}) == 4


def test_one_random_gold_per_training_example(tokenized):
  # qa_toy train example 2 has three golds: over many steps, every one of them is drawn.
  ids = tokenized[("qa_toy", 100, "train")]
  sampler = batching.EpochSampler(ids, batch_size=3, seed=0)
  seen = collections.defaultdict(set)
  for step in range(30):
    examples = sampler.examples(step)
    batch = sampler(step)
    for row, example in enumerate(examples):
      seen[int(example)].add(batch["target_ids"][row].tobytes())
  assert [len(seen[i]) for i in range(3)] == [2, 1, 3]


def test_epoch_sampler_covers_each_epoch_once_and_resumes(tokenized):
  pool = batching.source_pool(tokenized, ["sentiment_toy"], [100, 13, 21])  # train + dev
  assert len(pool) == 24
  np.testing.assert_array_equal(pool.input_ids[4:8], tokenized[("sentiment_toy", 100, "dev")].input_ids)
  sampler = batching.EpochSampler(pool, batch_size=5, seed=3)
  assert sampler.steps_for_epochs(2) == 10 and sampler.steps_per_epoch == 24 / 5
  stream = np.concatenate([sampler.examples(step) for step in range(10)])  # 50 = 2 epochs + 2
  assert sorted(stream[:24].tolist()) == list(range(24))
  assert sorted(stream[24:48].tolist()) == list(range(24))
  assert not np.array_equal(stream[:24], stream[24:48])  # a new shuffle each epoch
  again = batching.EpochSampler(pool, batch_size=5, seed=3)
  np.testing.assert_array_equal(again(7)["input_ids"], sampler(7)["input_ids"])
  assert sampler(7)["input_ids"].shape == (5, SPEC.max_input_len)


def test_pooled_examples_keep_their_own_golds(tokenizer, tokenized):
  parts = [tokenized[("qa_toy", 100, "train")], tokenized[("qa_toy", 13, "dev")]]
  pool = batching.concat_splits(parts)
  assert pool.answers == parts[0].answers + parts[1].answers
  for i, golds in enumerate(pool.answers):
    for j, gold in enumerate(golds):
      batch = batching.make_batch(pool, np.array([i]), np.array([j]))
      assert _row(batch["target_ids"][0], batch["target_mask"][0]) == _reference_ids(tokenizer, gold, 6)


def test_grid_batches_have_a_run_axis_and_each_run_its_own_seed(tokenized):
  train = {s: tokenized[("sentiment_toy", s, "train")] for s in (100, 13, 21)}
  run_seeds = [100, 13, 21, 100]  # e.g. seeds x learning rates: runs 0 and 3 share seed 100
  grid = batching.GridSampler.create(train, run_seeds, batch_size=3)
  batch = grid(4)
  assert batch["input_ids"].shape == (4, 3, SPEC.max_input_len)
  for r, seed in enumerate(run_seeds):
    assert {tuple(x) for x in batch["input_ids"][r]} <= _rows_of(train[seed])
  np.testing.assert_array_equal(batch["input_ids"][0], batch["input_ids"][3])
  with pytest.raises(KeyError, match="no train split for the run seed"):
    batching.GridSampler.create(train, [42], batch_size=3)


def test_eval_batches_keep_file_order_and_mask_padding(tokenized):
  ids = tokenized[("qa_toy", 100, "train")]  # 3 examples
  batches = list(batching.eval_batches(ids, batch_size=2))
  assert len(batches) == 2
  assert batches[1].mask.tolist() == [1, 0] and batches[1].indices.tolist() == [2, -1]
  real = np.concatenate([b.batch["input_ids"][b.mask == 1] for b in batches])
  np.testing.assert_array_equal(real, ids.input_ids)
  first_golds = np.concatenate([b.batch["target_ids"][b.mask == 1] for b in batches])
  np.testing.assert_array_equal(first_golds, ids.target_ids[ids.gold_offsets[:-1]])
  assert [ids.answers[i] for b in batches for i in b.indices if i >= 0] == list(ids.answers)
  # The padding row repeats its batch's own first example: the batch's longest input stays a real one.
  np.testing.assert_array_equal(batches[1].batch["input_ids"][1], ids.input_ids[2])


def test_grid_eval_batches_pad_shorter_runs(tokenized):
  splits = [tokenized[("qa_toy", 100, "test")], tokenized[("sentiment_toy", 100, "test")]]  # 2 and 3
  batches = list(batching.grid_eval_batches(splits, batch_size=2))
  assert len(batches) == 2
  assert batches[0].batch["input_ids"].shape == (2, 2, SPEC.max_input_len)
  assert batches[1].mask.tolist() == [[0, 0], [1, 0]]
  assert batches[1].indices.tolist() == [[-1, -1], [2, -1]]


def test_mixed_lengths_are_refused(data, tokenizer, tokenized):
  other = batching.tokenize_split(
    data["qa_toy"].split(13, "train"), tokenizer, dataclasses.replace(SPEC, max_input_len=32)
  )
  with pytest.raises(ValueError, match="different lengths"):
    batching.concat_splits([tokenized[("qa_toy", 100, "train")], other])


def test_kept_lines_without_an_answer_evaluate_with_an_empty_target_and_score_0(tokenizer):
  # A downstream dev/test file with lines without an answer, kept as the reference kept them.
  from mpt_jax import metrics

  split = crossfit.Split(
    "qa_toy",
    100,
    "dev",
    "qa_toy_3_100_dev.tsv",
    ("q0", "q1", "q2", "q3"),
    ((), ("honey",), ("eight", "8"), ()),
    num_without_answer=2,
  )
  ids = batching.tokenize_split(split, tokenizer, SPEC)
  assert ids.num_golds.tolist() == [0, 1, 2, 0]
  batch = next(batching.eval_batches(ids, batch_size=4)).batch
  assert batch["target_mask"][[0, 3]].sum() == 0 and (batch["target_ids"][[0, 3]] == PAD_ID).all()
  np.testing.assert_array_equal(batch["target_ids"][1], ids.target_ids[0])
  np.testing.assert_array_equal(batch["target_ids"][2], ids.target_ids[1])
  with pytest.raises(ValueError, match="2 example.s. without a gold answer cannot be trained on"):
    batching.EpochSampler(ids, batch_size=2)
  # As the reference's EM: no gold scores 0, even for an empty prediction.
  assert metrics.evaluate("qa_toy", ["", "honey", "8", "x"], ids.answers, metric="EM") == 0.5
  only_empty = dataclasses.replace(split, inputs=("q0",), answers=((),))
  empty_batch = next(batching.eval_batches(batching.tokenize_split(only_empty, tokenizer, SPEC), 2)).batch
  assert empty_batch["target_mask"].sum() == 0


# --- length buckets --------------------------------------------------------------------------------------

BUCKETS = batching.LengthBuckets(input_multiple=8, target_multiple=4)
LONG_SPEC = TextSpec(max_input_len=64, max_target_len=12)  # room to cut: most inputs are shorter


@pytest.fixture(scope="module")
def tokenized_long(data, tokenizer):
  return batching.tokenize_tasks(data, tokenizer, LONG_SPEC)


def test_bucket_length_rounds_up_to_a_multiple_within_the_maximum():
  assert [batching.bucket_length(n, 64, 512) for n in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
  assert batching.bucket_length(30, 64, 48) == 48  # never more than what is stored
  assert batching.bucket_length(3, 0, 512) == 512  # 0: no bucketing
  with pytest.raises(ValueError, match=">= 0"):
    batching.LengthBuckets(-1, 4)


def _assert_cut_of(bucketed: dict, padded: dict, *others: dict) -> None:
  """`bucketed` is `padded` without trailing columns that are padding in every row, at the bucket length
  of the longest row of `padded` and `others` (batches cut to the same shape)."""
  for key, multiple in (("input", 8), ("target", 4)):
    stored = padded[f"{key}_ids"].shape[-1]
    length = bucketed[f"{key}_ids"].shape[-1]
    longest = max(int(b[f"{key}_mask"].sum(-1).max()) for b in (padded, *others))
    assert length == batching.bucket_length(longest, multiple, stored) >= longest
    assert length % multiple == 0 or length == stored
    for part in ("ids", "mask"):
      np.testing.assert_array_equal(bucketed[f"{key}_{part}"], padded[f"{key}_{part}"][..., :length])
      assert not padded[f"{key}_{part}"][..., length:].any()


def test_every_sampler_cuts_its_batches_to_bucket_lengths_only(tokenized_long):
  episodes = (_sampler(tokenized_long), _sampler(tokenized_long, buckets=BUCKETS))
  shapes = set()
  for step in range(12):
    padded, bucketed = (sampler(step) for sampler in episodes)
    lengths = {(bucketed[p]["input_ids"].shape[-1], bucketed[p]["target_ids"].shape[-1]) for p in bucketed}
    assert len(lengths) == 1  # support and query share one shape
    shapes |= lengths
    _assert_cut_of(bucketed["support"], padded["support"], padded["query"])
    _assert_cut_of(bucketed["query"], padded["query"], padded["support"])
  assert max(length for length, _ in shapes) < LONG_SPEC.max_input_len  # there was padding to cut
  pool = batching.source_pool(tokenized_long, ["sentiment_toy"], [100, 13, 21])
  epoch = (batching.EpochSampler(pool, 5, 3), batching.EpochSampler(pool, 5, 3, BUCKETS))
  train = {s: tokenized_long[("sentiment_toy", s, "train")] for s in (100, 13)}
  grid = (
    batching.GridSampler.create(train, [100, 13, 100], 3),
    batching.GridSampler.create(train, [100, 13, 100], 3, buckets=BUCKETS),
  )
  for padded_sampler, bucketed_sampler in (epoch, grid):
    for step in (0, 5):
      _assert_cut_of(bucketed_sampler(step), padded_sampler(step))
      # Still a pure function of the step: a fresh sampler gives the same batch.
      again = dataclasses.replace(bucketed_sampler)(step)
      for key in batching.BATCH_KEYS:
        np.testing.assert_array_equal(again[key], bucketed_sampler(step)[key])


def test_eval_batches_are_bucketed_with_their_masks_and_indices(tokenized_long):
  splits = [tokenized_long[("qa_toy", 100, "test")], tokenized_long[("sentiment_toy", 100, "test")]]
  padded = list(batching.grid_eval_batches(splits, 2))
  bucketed = list(batching.grid_eval_batches(splits, 2, BUCKETS))
  for p, b in zip(padded, bucketed, strict=True):
    _assert_cut_of(b.batch, p.batch)
    np.testing.assert_array_equal(b.mask, p.mask)
    np.testing.assert_array_equal(b.indices, p.indices)
  assert bucketed[-1].batch["input_ids"].shape[-1] < LONG_SPEC.max_input_len
  for p, b in zip(
    batching.eval_batches(splits[1], 2), batching.eval_batches(splits[1], 2, BUCKETS), strict=True
  ):
    _assert_cut_of(b.batch, p.batch)
