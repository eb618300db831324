"""An offline task gym in the CrossFit layout: related task families, so that knowledge can transfer.

Every task belongs to a family whose tasks share their structure and part of their lexicon, and differ in
the rest (label words, field names, lexicons, the rule itself), so that an initialization learned on some
tasks of a family can help on another:

  classification (k=16 per class in train and dev, like CrossFit):
    sentiment  a text with more words of one polarity lexicon than of the other -> "positive"/"negative",
               "good"/"bad", "great"/"terrible", "happy"/"sad" (lexicons overlap across tasks)
    topic      a text with keywords of one topic -> the topic's name ("sports", "music", ...)
    pair       two texts, "sentence 1: ... [SEP] sentence 2: ..." -> same/different, entailment, 3-way NLI
  non-classification (k=32 in train and dev):
    transform  copy, reverse, first-and-last, sort the words of a text (EM)
    mapping    translate words through a dictionary that the tasks partly share (EM)
    qa         extraction QA "question: ... context: ..." (QA-F1; several golds: "kettle", "the kettle")
    keywords   list the key words of a text, in order (Rouge-L)

Texts are made of generated pseudo-words; labels are real words. `write_synthetic_gym(out_dir, seed)`
writes every task for the 5 CrossFit seeds in a second or so, the same bytes for the same seed, beside
the gym's metric table (`synthetic_task_metrics.json`) and settings (`synthetic_settings.json`). The gym
and its settings are known to `mpt_jax.data.settings` under the name "synthetic", like CrossFit's.
Test sets are the same for every seed (as in CrossFit, where test is the task's whole validation split)
and disjoint from every train and dev file.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from mpt_jax.data import crossfit
from mpt_jax.data.crossfit import SEEDS

GYM_NAME = "synthetic"
METRICS_FILE = "synthetic_task_metrics.json"
SETTINGS_FILE = "synthetic_settings.json"
K_PER_CLASS = 16
K = 32
TEST_SIZE = 100

Example = tuple[str, tuple[str, ...]]  # (input, golds)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  family: str
  metric: str
  labels: tuple[str, ...] | None  # label words of a classification task; None otherwise
  # make(rng, label) -> (input, golds); label is one of `labels` (classification) or None.
  make: Callable[[random.Random, str | None], Example]

  @property
  def classification(self) -> bool:
    return self.labels is not None


# --- the tasks: names and metrics are fixed; the lexicons behind them depend on the gym seed -----------

_SENTIMENT = (  # name, field name, label words (positive first)
  ("synth-sentiment_a", "review", ("positive", "negative")),
  ("synth-sentiment_b", "tweet", ("good", "bad")),
  ("synth-sentiment_c", "comment", ("great", "terrible")),
  ("synth-sentiment_d", "text", ("happy", "sad")),
)
_TOPICS = ("sports", "music", "science", "politics", "food", "travel", "health", "business")
_TOPIC = (  # name, field name, topics (label words)
  ("synth-topic_a", "news", ("sports", "music", "science")),
  ("synth-topic_b", "headline", ("politics", "food", "travel", "sports")),
  ("synth-topic_c", "question", ("health", "business", "music")),
  ("synth-topic_d", "article", ("science", "travel", "business", "food")),
)
_PAIR = (  # name, field names, label words, rule
  ("synth-pair_paraphrase", ("sentence 1", "sentence 2"), ("equivalent", "not_equivalent"), "reorder"),
  ("synth-pair_duplicate", ("question 1", "question 2"), ("duplicate", "not_duplicate"), "reorder"),
  ("synth-pair_entailment", ("premise", "hypothesis"), ("entailment", "not_entailment"), "subset"),
  ("synth-pair_nli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "nli"),
)
_TRANSFORM = (
  "synth-transform_copy",
  "synth-transform_reverse",
  "synth-transform_first_last",
  "synth-transform_sort",
)
_MAPPING = ("synth-mapping_a", "synth-mapping_b", "synth-mapping_c")
_QA = (  # name, fact template, question template, article before the answer
  ("synth-qa_likes", "{name} likes the {obj}.", "what does {name} like?", "the"),
  ("synth-qa_owns", "{name} owns a {obj}.", "what does {name} own?", "a"),
  ("synth-qa_made", "{name} made the {obj}.", "what did {name} make?", "the"),
  ("synth-qa_found", "{name} found a {obj}.", "what did {name} find?", "a"),
)
_KEYWORDS = ("synth-keywords_a", "synth-keywords_b")

_CLASSIFICATION_METRICS = {
  "synth-sentiment_a": "Classification-F1",
  "synth-sentiment_b": "Classification-F1",
  "synth-sentiment_c": "ACC",
  "synth-sentiment_d": "Classification-F1",
  "synth-topic_a": "Classification-F1",
  "synth-topic_b": "ACC",
  "synth-topic_c": "Classification-F1",
  "synth-topic_d": "Classification-F1",
  "synth-pair_paraphrase": "ACC",
  "synth-pair_duplicate": "Classification-F1",
  "synth-pair_entailment": "ACC",
  "synth-pair_nli": "Classification-F1",
}
TASK_METRICS = {
  **_CLASSIFICATION_METRICS,
  **{name: "EM" for name in _TRANSFORM + _MAPPING},
  **{spec[0]: "QA-F1" for spec in _QA},
  **{name: "Rouge-L" for name in _KEYWORDS},
}
CLASSIFICATION_TASKS = tuple(_CLASSIFICATION_METRICS)

# Source and target tasks are disjoint; every family has tasks on the source side.
_CLS_TARGET = ("synth-sentiment_d", "synth-topic_d", "synth-pair_nli")
_CLS_SOURCE = tuple(t for t in CLASSIFICATION_TASKS if t not in _CLS_TARGET)
_NOCLS_TARGET = ("synth-transform_sort", "synth-mapping_c", "synth-qa_found", "synth-keywords_b")
_NOCLS_SOURCE = tuple(t for t in TASK_METRICS if t not in CLASSIFICATION_TASKS and t not in _NOCLS_TARGET)
SETTINGS = {
  "synth_cls2cls": {"source": list(_CLS_SOURCE), "target": list(_CLS_TARGET)},
  "synth_nocls2cls": {"source": list(_NOCLS_SOURCE), "target": list(_CLS_TARGET)},
  "synth_nocls2nocls": {"source": list(_NOCLS_SOURCE), "target": list(_NOCLS_TARGET)},
  "synth_both2cls": {"source": list(_CLS_SOURCE[::2] + _NOCLS_SOURCE[::2]), "target": list(_CLS_TARGET)},
  # Two source tasks, one target: the smallest end-to-end run (demo, smoke tests).
  "synth_mini": {"source": ["synth-sentiment_a", "synth-topic_a"], "target": ["synth-sentiment_d"]},
}


# --- lexicons --------------------------------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# Words the generated vocabulary must not contain: label words, field names, template words.
_RESERVED = (
  {w for spec in _SENTIMENT for w in spec[2]}
  | set(_TOPICS)
  | {w for spec in _PAIR for w in spec[2]}
  | {
    "same",
    "not",
    "sentence",
    "question",
    "premise",
    "hypothesis",
    "context",
    "text",
    "news",
    "likes",
    "owns",
    "made",
    "found",
    "like",
    "own",
    "make",
    "find",
    "what",
    "does",
    "did",
    "the",
    "a",
    "an",
    "translate",
    "summarize",
    "review",
    "tweet",
    "comment",
    "headline",
    "article",
    "sep",
    "words",
    "more",
    "some",
    "tide",
    "bone",
    "note",
    "name",
    "time",
    "vote",
    "pole",
    "sale",
  }
)


def _vocabulary(rng: random.Random, size: int) -> list[str]:
  words, seen = [], set(_RESERVED)
  while len(words) < size:
    syllables = rng.choice((2, 2, 3))
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    if rng.random() < 0.3:
      word += rng.choice("nrsl")
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words


@dataclasses.dataclass(frozen=True)
class _Lexicon:
  filler: list[str]
  positive: list[str]
  negative: list[str]
  topics: dict[str, list[str]]
  names: list[str]
  objects: list[str]
  source_words: list[str]
  target_words: list[str]
  keywords: list[str]


def _lexicon(seed: int) -> _Lexicon:
  rng = random.Random(f"mpt-synthetic/{seed}/lexicon")
  words = _vocabulary(rng, 700)
  take = iter(words)

  def next_words(n):
    return [next(take) for _ in range(n)]

  return _Lexicon(
    filler=next_words(150),
    positive=next_words(40),
    negative=next_words(40),
    topics={topic: next_words(16) for topic in _TOPICS},
    names=[w.capitalize() for w in next_words(40)],
    objects=next_words(60),
    source_words=next_words(40),
    target_words=next_words(40),
    keywords=next_words(30),
  )


# --- task generators -------------------------------------------------------------------------------------


def _sentiment_tasks(lex: _Lexicon, seed: int) -> list[TaskSpec]:
  specs = []
  for name, field, labels in _SENTIMENT:
    rng = random.Random(f"mpt-synthetic/{seed}/{name}/lexicon")
    # Each task knows 24 of the 40 words of each polarity: tasks share most of their lexicons.
    polar = {labels[0]: rng.sample(lex.positive, 24), labels[1]: rng.sample(lex.negative, 24)}

    def make(rng, label, field=field, labels=labels, polar=polar):
      other = labels[1] if label == labels[0] else labels[0]
      n_main = rng.randint(2, 4)
      words = (
        rng.sample(lex.filler, rng.randint(4, 8))
        + rng.sample(polar[label], n_main)
        + rng.sample(polar[other], rng.randint(0, n_main - 1))
      )
      rng.shuffle(words)
      return f"{field}: {' '.join(words)}", (label,)

    specs.append(TaskSpec(name, "sentiment", TASK_METRICS[name], labels, make))
  return specs


def _topic_tasks(lex: _Lexicon) -> list[TaskSpec]:
  specs = []
  for name, field, topics in _TOPIC:

    def make(rng, label, field=field, topics=topics):
      words = rng.sample(lex.filler, rng.randint(3, 7)) + rng.sample(lex.topics[label], rng.randint(2, 4))
      if rng.random() < 0.3:  # a stray keyword of another topic of the task
        words.append(rng.choice(lex.topics[rng.choice([t for t in topics if t != label])]))
      rng.shuffle(words)
      return f"{field}: {' '.join(words)}", (label,)

    specs.append(TaskSpec(name, "topic", TASK_METRICS[name], topics, make))
  return specs


def _pair_tasks(lex: _Lexicon) -> list[TaskSpec]:
  specs = []
  for name, (field_1, field_2), labels, rule in _PAIR:

    def make(rng, label, field_1=field_1, field_2=field_2, labels=labels, rule=rule):
      first = rng.sample(lex.filler, rng.randint(5, 9))
      fresh = [w for w in lex.filler if w not in first]
      if rule == "reorder":  # same words in another order (one may change) vs half of them replaced
        second = first[:]
        rng.shuffle(second)
        changes = rng.randint(0, 1) if label == labels[0] else max(2, len(first) // 2)
        for position in rng.sample(range(len(second)), changes):
          second[position] = rng.choice(fresh)
      else:  # a subset of the first text; "not" makes a contradiction; unrelated words are neutral
        entailed = label == labels[0]
        if entailed or label == "contradiction":
          second = rng.sample(first, rng.randint(2, 4))
          if label == "contradiction":
            second.insert(1, "not")
        else:
          second = rng.sample(fresh, rng.randint(2, 3)) + rng.sample(first, 1)
          rng.shuffle(second)
      return f"{field_1}: {' '.join(first)} [SEP] {field_2}: {' '.join(second)}", (label,)

    specs.append(TaskSpec(name, "pair", TASK_METRICS[name], labels, make))
  return specs


def _transform_tasks(lex: _Lexicon) -> list[TaskSpec]:
  rules = {
    "synth-transform_copy": lambda words: words,
    "synth-transform_reverse": lambda words: words[::-1],
    "synth-transform_first_last": lambda words: [words[0], words[-1]],
    "synth-transform_sort": sorted,
  }
  specs = []
  for name in _TRANSFORM:

    def make(rng, label, rule=rules[name]):
      words = rng.sample(lex.filler, rng.randint(3, 7))
      return f"text: {' '.join(words)}", (" ".join(rule(words)),)

    specs.append(TaskSpec(name, "transform", TASK_METRICS[name], None, make))
  return specs


def _mapping_tasks(lex: _Lexicon, seed: int) -> list[TaskSpec]:
  base = dict(zip(lex.source_words, lex.target_words))
  specs = []
  for i, name in enumerate(_MAPPING):
    rng = random.Random(f"mpt-synthetic/{seed}/{name}/lexicon")
    mapping = dict(base)
    if i > 0:  # later tasks permute the translations of a third of the words among themselves
      changed = rng.sample(lex.source_words, len(lex.source_words) // 3)
      targets = [mapping[w] for w in changed]
      rng.shuffle(targets)
      mapping.update(zip(changed, targets))

    def make(rng, label, mapping=mapping):
      words = rng.sample(lex.source_words, rng.randint(2, 6))
      return f"translate: {' '.join(words)}", (" ".join(mapping[w] for w in words),)

    specs.append(TaskSpec(name, "mapping", TASK_METRICS[name], None, make))
  return specs


def _qa_tasks(lex: _Lexicon) -> list[TaskSpec]:
  specs = []
  for name, fact, question, article in _QA:

    def make(rng, label, fact=fact, question=question, article=article):
      names = rng.sample(lex.names, rng.randint(2, 4))
      objects = rng.sample(lex.objects, len(names))
      facts = [fact.format(name=n, obj=o) for n, o in zip(names, objects)]
      # Facts of the other QA tasks distract: the question's relation must be read.
      for _ in range(rng.randint(0, 2)):
        other = rng.choice([spec for spec in _QA if spec[1] != fact])
        facts.append(other[1].format(name=rng.choice(names), obj=rng.choice(lex.objects)))
      rng.shuffle(facts)
      asked = rng.randrange(len(names))
      answer = objects[asked]
      text = f"question: {question.format(name=names[asked])} context: {' '.join(facts)}"
      return text, (answer, f"{article} {answer}")

    specs.append(TaskSpec(name, "qa", TASK_METRICS[name], None, make))
  return specs


def _keyword_tasks(lex: _Lexicon, seed: int) -> list[TaskSpec]:
  specs = []
  for name in _KEYWORDS:
    rng = random.Random(f"mpt-synthetic/{seed}/{name}/lexicon")
    keywords = set(rng.sample(lex.keywords, 20))  # the two tasks share about half of their key words

    def make(rng, label, keywords=sorted(keywords)):
      words = rng.sample(lex.filler, rng.randint(5, 9)) + rng.sample(keywords, rng.randint(1, 4))
      rng.shuffle(words)
      key = set(keywords)
      return f"summarize: {' '.join(words)}", (" ".join(w for w in words if w in key),)

    specs.append(TaskSpec(name, "keywords", TASK_METRICS[name], None, make))
  return specs


def task_specs(seed: int = 0) -> dict[str, TaskSpec]:
  """Every task of the gym for this gym seed, by name."""
  lex = _lexicon(seed)
  specs = (
    _sentiment_tasks(lex, seed)
    + _topic_tasks(lex)
    + _pair_tasks(lex)
    + _transform_tasks(lex)
    + _mapping_tasks(lex, seed)
    + _qa_tasks(lex)
    + _keyword_tasks(lex, seed)
  )
  assert [s.name for s in specs] == list(TASK_METRICS), "task tables out of sync"
  return {s.name: s for s in specs}


# --- writing ---------------------------------------------------------------------------------------------


def _draw(spec: TaskSpec, rng: random.Random, count: int, seen: set[str]) -> list[Example]:
  """`count` examples with inputs unseen so far; classes balanced (count per class for classification)."""
  labels = spec.labels if spec.classification else (None,)
  examples = []
  for label in labels:
    for _ in range(count):
      for _attempt in range(1000):
        text, golds = spec.make(rng, label)
        if text not in seen:
          break
      else:
        raise RuntimeError(f"{spec.name}: cannot draw {count} distinct examples; lower k or test_size")
      seen.add(text)
      examples.append((text, golds))
  rng.shuffle(examples)
  return examples


def write_synthetic_gym(
  out_dir: str | os.PathLike,
  seed: int = 0,
  tasks: Sequence[str] | None = None,
  seeds: Sequence[int] = SEEDS,
  k_per_class: int = K_PER_CLASS,
  k: int = K,
  test_size: int = TEST_SIZE,
) -> list[str]:
  """Writes the gym in the CrossFit layout under `out_dir`; returns the task names written.

  `out_dir/{task}/{task}_{k}_{data_seed}_{train,dev,test}.tsv`, with k = `k_per_class` examples per class
  for classification tasks and `k` examples otherwise, in train and dev; `test_size` test examples
  (spread over the classes). The same `seed` gives the same bytes.
  """
  specs = task_specs(seed)
  names = list(specs) if tasks is None else list(tasks)
  unknown = [t for t in names if t not in specs]
  if unknown:
    raise ValueError(f"not tasks of the synthetic gym: {unknown}; its tasks: {list(specs)}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in names:
    spec = specs[name]
    n_labels = len(spec.labels) if spec.classification else 1
    file_k = k_per_class if spec.classification else k
    seen: set[str] = set()
    test_rng = random.Random(f"mpt-synthetic/{seed}/{name}/test")
    test = _draw(spec, test_rng, -(-test_size // n_labels), seen)[:test_size]
    seen = {text for text, _ in test}
    task_dir = out_dir / name
    task_dir.mkdir(exist_ok=True)
    for data_seed in seeds:
      rng = random.Random(f"mpt-synthetic/{seed}/{name}/{data_seed}")
      seen_here = set(seen)  # train and dev disjoint from each other and from test
      files = {
        "train": _draw(spec, rng, file_k, seen_here),
        "dev": _draw(spec, rng, file_k, seen_here),
        "test": test,
      }
      for split, examples in files.items():
        (task_dir / f"{name}_{file_k}_{data_seed}_{split}.tsv").write_bytes(crossfit.tsv_bytes(examples))
  (out_dir / METRICS_FILE).write_bytes(crossfit.json_bytes(TASK_METRICS))
  (out_dir / SETTINGS_FILE).write_bytes(crossfit.json_bytes(SETTINGS))
  return names
