"""A real-language offline task gym built from WordNet 3.0, in the CrossFit layout.

The synthetic gym (`mpt_jax.data.synthetic`) is made of pseudo-words; this one asks real English
questions about real words, so that a frozen T5 that was pretrained on English (assets/small_t5) has
something to bring. Every task is read off the WordNet database (`experiments/wordnet.py`): definitions and
example sentences, lexicographer categories (noun.animal, verb.motion, ...), topic domains, verb frames,
and the relations between synsets and words (synonym, hypernym, antonym, similar, attribute, pertainym,
derivation, entailment, part holonym, instance).

  classification (k=16 per class in train and in dev; label words are real words):
    wn-noun_category_{living,objects,mind,happenings,relations}  category of a noun from its definition
    wn-verb_category_{physical,social}   category of a verb        wn-part_of_speech      noun/verb/...
    wn-pos_in_context   part of speech of a word in a sentence     wn-topic_domain        law/music/...
    wn-synonym_pair     same/different    wn-hypernym_pair yes/no  wn-antonym_pair        opposite/similar
    wn-definition_match correct/wrong     wn-verb_transitivity     wn-adjective_type      descriptive/...
  non-classification (k=32 in train and in dev):
    EM:    wn-word_from_definition, wn-hypernym_of_word, wn-instance_of, wn-synonym_of_word,
           wn-antonym_of_adjective, wn-example_cloze, wn-noun_of_verb, wn-attribute_of_adjective,
           wn-noun_of_adjective, wn-verb_entailment, wn-whole_of_part
    QA-F1: wn-definition_completion, wn-define_word

Inputs carry CrossFit-style field prefixes ("word: dog [SEP] definition: ..."); generation tasks list
every acceptable answer as a gold (all lemmas of the answer synset). The test split is one fixed set per
task (as CrossFit's test is the task's whole validation split), disjoint from every train and dev file;
train and dev of a data seed are disjoint too.

The generated gym is shipped in assets/wordnet_gym (users need no WordNet); `write_wordnet_gym` rebuilds
the same bytes from the database (`apt-get install wordnet-base`). The gym, its metric table and its
settings (`wn_cls2cls`, `wn_nocls2cls`, `wn_both2cls`, `wn_nocls2nocls`, `wn_mini`; sources and targets
disjoint) are what `wordnet_gym()` returns for `mpt_jax.data.settings`.

  python -m experiments.wordnet_gym --out_dir=mpt_jax/assets/wordnet_gym   # regenerate the shipped gym
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mpt_jax import resources
from mpt_jax.data import settings as settings_lib
from experiments import wordnet as wn
from mpt_jax.data import crossfit
from mpt_jax.data.crossfit import SEEDS

GYM_NAME = "wordnet"
METRICS_FILE = "wordnet_task_metrics.json"
SETTINGS_FILE = "wordnet_settings.json"
INFO_FILE = "wordnet_gym_info.json"
LICENSE_FILE = "WORDNET_LICENSE.txt"
SHIPPED_DIR = resources.WORDNET_GYM_DIR
K_PER_CLASS = 16
K = 32
TEST_SIZE_CLASSIFICATION = 120  # divisible by 2..6 classes: balanced test sets
TEST_SIZE = 100
SEP = " [SEP] "

Example = tuple[str, tuple[str, ...]]  # (input, golds); a classification example has one gold, its label


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  metric: str
  labels: tuple[str, ...] | None  # label words of a classification task; None otherwise
  # build(index) -> every candidate example of the task, in a deterministic order
  build: Callable[[WordNetIndex], list[Example]]

  @property
  def classification(self) -> bool:
    return self.labels is not None


# --- the database, indexed for the task builders ---------------------------------------------------------


class WordNetIndex:
  """The synsets plus the look-ups that the tasks share (all in database order: deterministic)."""

  def __init__(self, synsets: dict[tuple[str, int], wn.Synset]):
    self.synsets = synsets
    self.by_lexname: dict[str, list[wn.Synset]] = collections.defaultdict(list)
    self.senses: dict[str, list[wn.Synset]] = collections.defaultdict(list)  # lemma -> its synsets
    for s in synsets.values():
      self.by_lexname[s.lexname].append(s)
      for lemma in s.lemmas:
        self.senses[lemma.lower()].append(s)

  def __getitem__(self, key) -> wn.Synset:
    return self.synsets[key]

  def word_pointers(self, synset: wn.Synset, symbol: str) -> list[tuple[str, str]]:
    """(source word, target word) of the word-level pointers with this symbol."""
    return [
      (synset.lemmas[p.source_word - 1], self[p.target].lemmas[p.target_word - 1])
      for p in synset.pointers
      if p.symbol == symbol and p.source_word
    ]


def _clean(text: str) -> str:
  return " ".join(text.replace("\t", " ").split())


def _definition(s: wn.Synset) -> str:
  return _clean(s.definition)


def _is_word(lemma: str) -> bool:
  """A plain lower-case word or phrase: no digits, no names, no abbreviations with dots."""
  return bool(re.fullmatch(r"[a-z][a-z' -]*[a-z]", lemma))


def _single_word(lemma: str) -> bool:
  return bool(re.fullmatch(r"[a-z]+", lemma))


# --- classification tasks --------------------------------------------------------------------------------

# (task, lexicographer file -> label word); label words are real words.
_NOUN_CATEGORIES = (
  (
    "wn-noun_category_living",
    {
      "noun.animal": "animal",
      "noun.plant": "plant",
      "noun.person": "person",
      "noun.body": "body",
      "noun.food": "food",
    },
  ),
  (
    "wn-noun_category_objects",
    {
      "noun.artifact": "artifact",
      "noun.substance": "substance",
      "noun.object": "nature",
      "noun.location": "location",
      "noun.shape": "shape",
    },
  ),
  (
    "wn-noun_category_mind",
    {
      "noun.cognition": "thought",
      "noun.communication": "communication",
      "noun.feeling": "feeling",
      "noun.attribute": "attribute",
    },
  ),
  (
    "wn-noun_category_happenings",
    {
      "noun.act": "act",
      "noun.event": "event",
      "noun.process": "process",
      "noun.phenomenon": "phenomenon",
      "noun.time": "time",
    },
  ),
  (
    "wn-noun_category_relations",
    {
      "noun.group": "group",
      "noun.possession": "possession",
      "noun.quantity": "quantity",
      "noun.relation": "relation",
      "noun.state": "state",
    },
  ),
)
_VERB_CATEGORIES = (
  (
    "wn-verb_category_physical",
    {
      "verb.body": "body",
      "verb.contact": "contact",
      "verb.motion": "motion",
      "verb.consumption": "consumption",
      "verb.perception": "perception",
    },
  ),
  (
    "wn-verb_category_social",
    {
      "verb.cognition": "cognition",
      "verb.communication": "communication",
      "verb.competition": "competition",
      "verb.emotion": "emotion",
      "verb.possession": "possession",
    },
  ),
)
_DOMAINS = {
  "law": "law",
  "military": "military",
  "music": "music",
  "chemistry": "chemistry",
  "mathematics": "mathematics",
  "medicine": "medicine",
}
# wninput(5WN) verb frames: with a direct object, and without any object or complement.
_TRANSITIVE_FRAMES = {8, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 24, 25, 30, 31}
_INTRANSITIVE_FRAMES = {1, 2, 3, 4, 12, 13, 22, 23, 27}


def _category_task(lexnames: dict[str, str], field: str) -> Callable[[WordNetIndex], list[Example]]:
  def build(index: WordNetIndex) -> list[Example]:
    out = []
    for lexname, label in lexnames.items():
      for s in index.by_lexname[lexname]:
        word = s.lemmas[0]
        out.append((f"{field}: {word}{SEP}definition: {_definition(s)}", (label,)))
    return out

  return build


def _part_of_speech(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    word = s.lemmas[0]
    out.append((f"word: {word}{SEP}definition: {_definition(s)}", (wn.POS_NAMES[s.pos],)))
  return out


def _pos_in_context(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    for example in s.examples:
      sentence = _clean(example)
      for lemma in s.lemmas:
        if _single_word(lemma) and re.search(rf"\b{re.escape(lemma)}\b", sentence):
          out.append((f"sentence: {sentence}{SEP}word: {lemma}", (wn.POS_NAMES[s.pos],)))
          break
  return out


def _topic_domain(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    domains = {index[k].lemmas[0] for k in s.related(wn.TOPIC_DOMAIN)}
    labels = [_DOMAINS[d] for d in sorted(domains) if d in _DOMAINS]
    if len(labels) == 1:
      out.append((f"word: {s.lemmas[0]}{SEP}definition: {_definition(s)}", (labels[0],)))
  return out


def _synonym_sets(index: WordNetIndex) -> set[frozenset[str]]:
  return {
    frozenset((a.lower(), b.lower()))
    for s in index.synsets.values()
    for a in s.lemmas
    for b in s.lemmas
    if a != b
  }


def _synonym_pair(index: WordNetIndex) -> list[Example]:
  synonyms = _synonym_sets(index)
  out = []
  for lexname in sorted(index.by_lexname):
    group = index.by_lexname[lexname]
    rng = random.Random(f"wn-synonym_pair/{lexname}")
    for s in group:
      words = [w for w in s.lemmas if _is_word(w)]
      if len(words) < 2:
        continue
      out.append((f"word 1: {words[0]}{SEP}word 2: {words[1]}", ("same",)))
      other = rng.choice(group)  # a word of the same category: related in topic, not in meaning
      candidates = [
        w
        for w in other.lemmas
        if _is_word(w) and w != words[0] and frozenset((words[0].lower(), w.lower())) not in synonyms
      ]
      if candidates:
        out.append((f"word 1: {words[0]}{SEP}word 2: {candidates[0]}", ("different",)))
  return out


def _hypernym_pair(index: WordNetIndex) -> list[Example]:
  true_pairs = {
    (w.lower(), h.lower())
    for s in index.synsets.values()
    for k in s.related(wn.HYPERNYM)
    for w in s.lemmas
    for h in index[k].lemmas
  }
  out = []
  for lexname in sorted(index.by_lexname):
    group = [s for s in index.by_lexname[lexname] if s.pos == "n" and s.related(wn.HYPERNYM)]
    rng = random.Random(f"wn-hypernym_pair/{lexname}")
    for s in group:
      word = s.lemmas[0]
      if not _is_word(word):
        continue
      hypernym = index[s.related(wn.HYPERNYM)[0]].lemmas[0]
      out.append((f"word: {word}{SEP}broader term: {hypernym}", ("yes",)))
      other = index[rng.choice(group).related(wn.HYPERNYM)[0]].lemmas[0]
      if (word.lower(), other.lower()) not in true_pairs and other != word:
        out.append((f"word: {word}{SEP}broader term: {other}", ("no",)))
  return out


def _antonym_pair(index: WordNetIndex) -> list[Example]:
  """Adjective pairs that are opposite (antonym pointer) or similar (similar-to / same synset)."""
  synonyms = _synonym_sets(index)
  out = []
  for s in index.synsets.values():
    if s.pos != "a":
      continue
    for word, antonym in index.word_pointers(s, wn.ANTONYM):
      if _is_word(word) and _is_word(antonym):
        out.append((f"word 1: {word}{SEP}word 2: {antonym}", ("opposite",)))
    if not s.satellite:
      for k in s.related(wn.SIMILAR)[:2]:
        word, similar = s.lemmas[0], index[k].lemmas[0]
        if _is_word(word) and _is_word(similar) and frozenset((word, similar)) not in synonyms:
          out.append((f"word 1: {word}{SEP}word 2: {similar}", ("similar",)))
  return out


def _definition_match(index: WordNetIndex) -> list[Example]:
  out = []
  for lexname in sorted(index.by_lexname):
    group = index.by_lexname[lexname]
    rng = random.Random(f"wn-definition_match/{lexname}")
    for s in group:
      word = s.lemmas[0]
      if not _is_word(word):
        continue
      out.append((f"word: {word}{SEP}definition: {_definition(s)}", ("correct",)))
      other = rng.choice(group)
      if word.lower() not in {w.lower() for w in other.lemmas}:
        out.append((f"word: {word}{SEP}definition: {_definition(other)}", ("wrong",)))
  return out


def _verb_transitivity(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    if s.pos != "v":
      continue
    frames = {f for f, w in s.verb_frames if w in (0, 1)}
    if frames and frames <= _TRANSITIVE_FRAMES:
      label = "transitive"
    elif frames and frames <= _INTRANSITIVE_FRAMES:
      label = "intransitive"
    else:
      continue
    out.append((f"verb: {s.lemmas[0]}{SEP}definition: {_definition(s)}", (label,)))
  return out


def _adjective_type(index: WordNetIndex) -> list[Example]:
  labels = {"adj.all": "descriptive", "adj.pert": "relational"}
  return [
    (f"adjective: {s.lemmas[0]}{SEP}definition: {_definition(s)}", (labels[s.lexname],))
    for s in index.synsets.values()
    if s.lexname in labels
  ]


# --- non-classification tasks ----------------------------------------------------------------------------


def _golds(words: Iterable[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(w for w in words if w.strip()))


def _word_from_definition(index: WordNetIndex) -> list[Example]:
  return [
    (f"definition: {_definition(s)}{SEP}part of speech: {wn.POS_NAMES[s.pos]}", _golds(s.lemmas))
    for s in index.synsets.values()
    if any(_is_word(w) for w in s.lemmas)
  ]


def _related_lemmas_task(
  symbol: str, field: str, keep: Callable[[wn.Synset], bool] = lambda s: True, word_only: bool = True
) -> Callable[[WordNetIndex], list[Example]]:
  """A generation task: a synset's first lemma and definition -> the lemmas of the synsets it points to
  with `symbol` (e.g. its hypernyms), for the synsets that `keep` accepts and, if word_only, whose first
  lemma is a word."""

  def build(index: WordNetIndex) -> list[Example]:
    out = []
    for s in index.synsets.values():
      related = s.related(symbol)
      if related and keep(s) and (not word_only or _is_word(s.lemmas[0])):
        golds = _golds(w for k in related for w in index[k].lemmas)
        out.append((f"{field}: {s.lemmas[0]}{SEP}definition: {_definition(s)}", golds))
    return out

  return build


_hypernym_of_word = _related_lemmas_task(wn.HYPERNYM, "word", keep=lambda s: s.pos in "nv")
_instance_of = _related_lemmas_task(wn.INSTANCE_HYPERNYM, "name", word_only=False)
_attribute_of_adjective = _related_lemmas_task(wn.ATTRIBUTE, "adjective", keep=lambda s: s.pos == "a")
_verb_entailment = _related_lemmas_task(wn.ENTAILMENT, "verb")
_whole_of_part = _related_lemmas_task(wn.PART_HOLONYM, "part")


def _synonym_of_word(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    words = [w for w in s.lemmas if _is_word(w)]
    if len(words) >= 2:
      out.append((f"word: {words[0]}{SEP}definition: {_definition(s)}", _golds(words[1:])))
  return out


def _antonym_of_adjective(index: WordNetIndex) -> list[Example]:
  antonyms = collections.defaultdict(list)
  for s in index.synsets.values():
    if s.pos == "a":
      for word, antonym in index.word_pointers(s, wn.ANTONYM):
        if _is_word(word) and _is_word(antonym):
          antonyms[(word, s.key)].append(antonym)
  return [
    (f"adjective: {word}{SEP}definition: {_definition(index[key])}", _golds(found))
    for (word, key), found in antonyms.items()
  ]


def _example_cloze(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    for example in s.examples:
      sentence = _clean(example)
      for lemma in s.lemmas:
        pattern = rf"\b{re.escape(lemma)}\b"
        if _single_word(lemma) and len(re.findall(pattern, sentence)) == 1 and len(sentence.split()) >= 4:
          out.append((f"sentence: {re.sub(pattern, '___', sentence)}", (lemma,)))
          break
  return out


def _noun_of_verb(index: WordNetIndex) -> list[Example]:
  nouns = collections.defaultdict(list)
  for s in index.synsets.values():
    if s.pos == "v":
      for p in s.pointers:
        if p.symbol == wn.DERIVATION and p.source_word and p.target[0] == "n":
          verb, noun = s.lemmas[p.source_word - 1], index[p.target].lemmas[p.target_word - 1]
          if _single_word(verb) and _single_word(noun) and noun != verb:
            nouns[verb].append(noun)
  return [(f"verb: {verb}", _golds(found)) for verb, found in nouns.items()]


def _noun_of_adjective(index: WordNetIndex) -> list[Example]:
  """Relational adjectives and the noun they pertain to (musical -> music)."""
  nouns = collections.defaultdict(list)
  for s in index.synsets.values():
    if s.lexname == "adj.pert":
      for adjective, noun in index.word_pointers(s, wn.PERTAINYM):
        if _is_word(adjective) and _is_word(noun):
          nouns[adjective].append(noun)
  return [(f"adjective: {adjective}", _golds(found)) for adjective, found in nouns.items()]


def _definition_completion(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    words = _definition(s).split()
    if len(words) >= 8 and _is_word(s.lemmas[0]):
      cut = len(words) // 2
      out.append(
        (f"word: {s.lemmas[0]}{SEP}definition start: {' '.join(words[:cut])}", (" ".join(words[cut:]),))
      )
  return out


def _define_word(index: WordNetIndex) -> list[Example]:
  out = []
  for s in index.synsets.values():
    word = s.lemmas[0]
    if _is_word(word) and len(index.senses[word.lower()]) == 1:  # one sense: one right definition
      out.append((f"word: {word}{SEP}part of speech: {wn.POS_NAMES[s.pos]}", (_definition(s),)))
  return out


# --- the task table --------------------------------------------------------------------------------------


def _classification(name: str, metric: str, labels: Sequence[str], build) -> TaskSpec:
  return TaskSpec(name, metric, tuple(labels), build)


TASKS: tuple[TaskSpec, ...] = (
  *(
    _classification(name, "Classification-F1", m.values(), _category_task(m, "word"))
    for name, m in _NOUN_CATEGORIES
  ),
  *(
    _classification(name, "Classification-F1", m.values(), _category_task(m, "verb"))
    for name, m in _VERB_CATEGORIES
  ),
  _classification("wn-part_of_speech", "Classification-F1", wn.POS_NAMES.values(), _part_of_speech),
  _classification("wn-pos_in_context", "Classification-F1", wn.POS_NAMES.values(), _pos_in_context),
  _classification("wn-topic_domain", "Classification-F1", _DOMAINS.values(), _topic_domain),
  _classification("wn-synonym_pair", "ACC", ("same", "different"), _synonym_pair),
  _classification("wn-hypernym_pair", "ACC", ("yes", "no"), _hypernym_pair),
  _classification("wn-antonym_pair", "ACC", ("opposite", "similar"), _antonym_pair),
  _classification("wn-definition_match", "ACC", ("correct", "wrong"), _definition_match),
  _classification(
    "wn-verb_transitivity", "Classification-F1", ("transitive", "intransitive"), _verb_transitivity
  ),
  _classification("wn-adjective_type", "Classification-F1", ("descriptive", "relational"), _adjective_type),
  TaskSpec("wn-word_from_definition", "EM", None, _word_from_definition),
  TaskSpec("wn-hypernym_of_word", "EM", None, _hypernym_of_word),
  TaskSpec("wn-instance_of", "EM", None, _instance_of),
  TaskSpec("wn-synonym_of_word", "EM", None, _synonym_of_word),
  TaskSpec("wn-antonym_of_adjective", "EM", None, _antonym_of_adjective),
  TaskSpec("wn-example_cloze", "EM", None, _example_cloze),
  TaskSpec("wn-noun_of_verb", "EM", None, _noun_of_verb),
  TaskSpec("wn-attribute_of_adjective", "EM", None, _attribute_of_adjective),
  TaskSpec("wn-noun_of_adjective", "EM", None, _noun_of_adjective),
  TaskSpec("wn-verb_entailment", "EM", None, _verb_entailment),
  TaskSpec("wn-whole_of_part", "EM", None, _whole_of_part),
  TaskSpec("wn-definition_completion", "QA-F1", None, _definition_completion),
  TaskSpec("wn-define_word", "QA-F1", None, _define_word),
)
TASK_SPECS = {t.name: t for t in TASKS}
TASK_METRICS = {t.name: t.metric for t in TASKS}
CLASSIFICATION_TASKS = tuple(t.name for t in TASKS if t.classification)
NON_CLASSIFICATION_TASKS = tuple(t.name for t in TASKS if not t.classification)

# Settings mirror the study's: sources and targets disjoint, targets of the *2cls settings are
# classification. Each target has relatives among the cls sources (another category task of the same
# part of speech, another word-pair relation, part of speech out of context), so transfer is possible.
_CLS_TARGET = ("wn-noun_category_living", "wn-verb_category_social", "wn-antonym_pair", "wn-pos_in_context")
_CLS_SOURCE = tuple(t for t in CLASSIFICATION_TASKS if t not in _CLS_TARGET)
_NOCLS_TARGET = ("wn-hypernym_of_word", "wn-antonym_of_adjective", "wn-definition_completion")
_NOCLS_SOURCE = tuple(t for t in NON_CLASSIFICATION_TASKS if t not in _NOCLS_TARGET)
SETTINGS = {
  "wn_cls2cls": {"source": list(_CLS_SOURCE), "target": list(_CLS_TARGET)},
  "wn_nocls2cls": {"source": list(NON_CLASSIFICATION_TASKS), "target": list(_CLS_TARGET)},
  "wn_both2cls": {
    "source": list(_CLS_SOURCE[::2] + NON_CLASSIFICATION_TASKS[::2]),
    "target": list(_CLS_TARGET),
  },
  "wn_nocls2nocls": {"source": list(_NOCLS_SOURCE), "target": list(_NOCLS_TARGET)},
  # Two source tasks, one target: the smallest end-to-end run on real language.
  "wn_mini": {
    "source": ["wn-noun_category_objects", "wn-noun_category_mind"],
    "target": ["wn-noun_category_living"],
  },
}


def wordnet_gym() -> settings_lib.Gym:
  """The gym's metric table and settings, for `mpt_jax.data.settings` (no WordNet files needed)."""
  return settings_lib.make_gym(GYM_NAME, TASK_METRICS, SETTINGS, classification=CLASSIFICATION_TASKS)


def register(gym_dir: str | os.PathLike | None = None) -> settings_lib.Gym:
  """Makes the gym's tasks and settings known to every lookup of `mpt_jax.data.settings`.

  gym_dir: a generated gym (e.g. the shipped one) whose metric table and settings must be this
  module's; a stale directory is refused with a hint to regenerate it.
  """
  if gym_dir is not None:
    for name, expected in ((METRICS_FILE, TASK_METRICS), (SETTINGS_FILE, SETTINGS)):
      path = Path(gym_dir) / name
      if not path.is_file():
        raise FileNotFoundError(
          f"{path}: missing; {gym_dir} is not a generated WordNet gym (write one "
          f"with `python -m experiments.wordnet_gym --out_dir={gym_dir}`)"
        )
      if json.loads(path.read_text(encoding="utf-8")) != expected:
        raise ValueError(
          f"{path} differs from experiments/wordnet_gym.py's table: the gym in {gym_dir} "
          f"is stale; regenerate it with `python -m experiments.wordnet_gym "
          f"--out_dir={gym_dir}`"
        )
  return settings_lib.register_gym(GYM_NAME, TASK_METRICS, SETTINGS, classification=CLASSIFICATION_TASKS)


def shipped_gym_dir() -> Path:
  """The generated gym shipped with the package (mpt_jax/assets/wordnet_gym), checked to exist."""
  if not (SHIPPED_DIR / METRICS_FILE).is_file():
    raise FileNotFoundError(
      f"{SHIPPED_DIR}: the shipped WordNet gym is missing; regenerate it with `python -m "
      f"experiments.wordnet_gym --out_dir={SHIPPED_DIR}` (needs `apt-get install wordnet-base`)."
    )
  return SHIPPED_DIR


# --- writing ---------------------------------------------------------------------------------------------


def _unique(examples: list[Example]) -> list[Example]:
  """One example per input (the first), and none whose input or answers could break a TSV line."""
  seen, out = set(), []
  for text, golds in examples:
    if text in seen or not golds or not all(g.strip() for g in golds):
      continue
    seen.add(text)
    out.append((text, golds))
  return out


def _sample(pool: list[Example], rng: random.Random, count: int, what: str) -> list[Example]:
  if len(pool) < count:
    raise RuntimeError(f"{what}: only {len(pool)} candidate examples for {count}; lower k or test size")
  return rng.sample(pool, count)


def _split_examples(
  spec: TaskSpec, pool: list[Example], seeds: Sequence[int], k_per_class: int, k: int, test_size: int
) -> tuple[list[Example], dict[int, tuple[list[Example], list[Example]]]]:
  """(test, {seed: (train, dev)}): test fixed, every split disjoint from test and from each other."""
  by_label = {None: pool}
  if spec.classification:
    by_label = {label: [e for e in pool if e[1][0] == label] for label in spec.labels}
  test_rng = random.Random(f"mpt-wordnet/{spec.name}/test")
  per_label_test = test_size // len(by_label)
  test = [
    e
    for label, group in by_label.items()
    for e in _sample(group, test_rng, per_label_test, f"{spec.name} test [{label}]")
  ]
  test_rng.shuffle(test)
  test_inputs = {text for text, _ in test}
  per_seed = {}
  for seed in seeds:
    rng = random.Random(f"mpt-wordnet/{spec.name}/{seed}")
    train, dev = [], []
    for label, group in by_label.items():
      rest = [e for e in group if e[0] not in test_inputs]
      count = k_per_class if spec.classification else k
      drawn = _sample(rest, rng, 2 * count, f"{spec.name} seed {seed} [{label}]")
      train += drawn[:count]
      dev += drawn[count:]
    rng.shuffle(train)
    rng.shuffle(dev)
    per_seed[seed] = (train, dev)
  return test, per_seed


def database_fingerprint(wordnet_dir: str | os.PathLike | None = None) -> str:
  """sha256 over the four data files: the shipped gym is reproducible from exactly this database."""
  digest = hashlib.sha256()
  path = wn.wordnet_dir(wordnet_dir)
  for name in sorted(wn.DATA_FILES.values()):
    digest.update(name.encode())
    digest.update((path / name).read_bytes())
  return digest.hexdigest()


def write_wordnet_gym(
  out_dir: str | os.PathLike,
  wordnet_dir: str | os.PathLike | None = None,
  tasks: Sequence[str] | None = None,
  seeds: Sequence[int] = SEEDS,
  k_per_class: int = K_PER_CLASS,
  k: int = K,
) -> list[str]:
  """Writes the gym in the CrossFit layout under `out_dir`; returns the task names written.

  `out_dir/{task}/{task}_{k}_{seed}_{train,dev,test}.tsv` (k = k_per_class for classification, k
  otherwise), beside the metric table, the settings, an info file (database fingerprint, pool sizes) and
  the WordNet license. The same database gives the same bytes.
  """
  names = list(TASK_SPECS) if tasks is None else list(tasks)
  unknown = [t for t in names if t not in TASK_SPECS]
  if unknown:
    raise ValueError(f"not tasks of the WordNet gym: {unknown}; its tasks: {list(TASK_SPECS)}")
  index = WordNetIndex(wn.load_wordnet(wordnet_dir))
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  pool_sizes = {}
  for name in names:
    spec = TASK_SPECS[name]
    pool = _unique(spec.build(index))
    pool_sizes[name] = (
      {label: sum(e[1][0] == label for e in pool) for label in spec.labels}
      if spec.classification
      else len(pool)
    )
    test_size = TEST_SIZE_CLASSIFICATION if spec.classification else TEST_SIZE
    test, per_seed = _split_examples(spec, pool, seeds, k_per_class, k, test_size)
    file_k = k_per_class if spec.classification else k
    task_dir = out_dir / name
    task_dir.mkdir(exist_ok=True)
    for seed, (train, dev) in per_seed.items():
      for split, examples in (("train", train), ("dev", dev), ("test", test)):
        (task_dir / f"{name}_{file_k}_{seed}_{split}.tsv").write_bytes(crossfit.tsv_bytes(examples))
  (out_dir / METRICS_FILE).write_bytes(crossfit.json_bytes(TASK_METRICS))
  (out_dir / SETTINGS_FILE).write_bytes(crossfit.json_bytes(SETTINGS))
  info = {
    "source": "WordNet 3.0 (Debian wordnet-base; `apt-get install wordnet-base`)",
    "database_sha256": database_fingerprint(wordnet_dir),
    "classification": list(CLASSIFICATION_TASKS),
    "candidate_examples": pool_sizes,
    "k_per_class": k_per_class,
    "k": k,
    "seeds": list(seeds),
    "test_size": {"classification": TEST_SIZE_CLASSIFICATION, "other": TEST_SIZE},
  }
  (out_dir / INFO_FILE).write_bytes(crossfit.json_bytes(info))
  (out_dir / LICENSE_FILE).write_text(wn.WORDNET_LICENSE, encoding="utf-8")
  return names


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Writes the WordNet gym in the CrossFit layout.")
  parser.add_argument("--out_dir", default=str(SHIPPED_DIR))
  parser.add_argument("--wordnet_dir", default=None, help="default: $MPT_WORDNET_DIR or /usr/share/wordnet")
  args = parser.parse_args(argv)
  names = write_wordnet_gym(args.out_dir, args.wordnet_dir)
  print(f"wrote {len(names)} tasks to {args.out_dir}")


if __name__ == "__main__":
  main()
