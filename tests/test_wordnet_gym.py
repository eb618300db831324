"""The WordNet gym: the shipped files validate, splits are disjoint and balanced, the gym registers, the
database reader and the task builders give the hand-derived answers on a tiny database, and (where
WordNet is installed) regeneration reproduces the shipped bytes."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from experiments import wordnet, wordnet_gym
from mpt_jax.data import crossfit, settings

SHIPPED = wordnet_gym.SHIPPED_DIR
ALL_TASKS = list(wordnet_gym.TASK_METRICS)


@pytest.fixture(scope="module")
def shipped():
  return crossfit.read_crossfit(SHIPPED, ALL_TASKS)


def test_shipped_gym_passes_the_crossfit_validator_with_crossfit_k(shipped):
  assert sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()) == sorted(ALL_TASKS)
  for task, data in shipped.items():
    assert data.seeds == crossfit.SEEDS
    assert data.k == (16 if task in wordnet_gym.CLASSIFICATION_TASKS else 32), task


def test_splits_are_balanced_disjoint_and_test_is_fixed(shipped):
  for task, data in shipped.items():
    spec = wordnet_gym.TASK_SPECS[task]
    test = data.split(100, "test")
    for seed in crossfit.SEEDS:
      train, dev = data.split(seed, "train"), data.split(seed, "dev")
      assert data.split(seed, "test").inputs == test.inputs, (task, seed)
      assert not set(train.inputs) & set(dev.inputs), (task, seed)
      assert not (set(train.inputs) | set(dev.inputs)) & set(test.inputs), (task, seed)
      for split in (train, dev, test):
        assert len(set(split.inputs)) == len(split), (task, seed, split.split)
      if spec.classification:
        for split in (train, dev):
          counts = collections.Counter(golds[0] for golds in split.answers)
          assert counts == {label: 16 for label in spec.labels}, (task, seed, split.split)
        assert all(len(golds) == 1 for golds in train.answers + dev.answers + test.answers)
      else:
        assert len(train) == len(dev) == 32, (task, seed)
    if spec.classification:
      counts = collections.Counter(golds[0] for golds in test.answers)
      per_label = wordnet_gym.TEST_SIZE_CLASSIFICATION // len(spec.labels)
      assert counts == {label: per_label for label in spec.labels}, task
    else:
      assert len(test) == wordnet_gym.TEST_SIZE, task


def test_inputs_carry_field_prefixes_and_label_words_are_words(shipped):
  for task, data in shipped.items():
    for text in data.split(13, "train").inputs:
      assert text.split(":", 1)[0] in {
        "word",
        "verb",
        "adjective",
        "sentence",
        "word 1",
        "definition",
        "name",
        "part",
      }, (task, text)
    spec = wordnet_gym.TASK_SPECS[task]
    if spec.classification:
      assert all(label.isalpha() and label.islower() for label in spec.labels), task


def test_shipped_metric_table_and_settings_match_the_module():
  metrics = json.loads((SHIPPED / wordnet_gym.METRICS_FILE).read_text())
  assert metrics == wordnet_gym.TASK_METRICS
  assert set(metrics.values()) <= {"Classification-F1", "ACC", "EM", "QA-F1"}
  assert json.loads((SHIPPED / wordnet_gym.SETTINGS_FILE).read_text()) == wordnet_gym.SETTINGS
  cls = set(wordnet_gym.CLASSIFICATION_TASKS)
  for name, spec in wordnet_gym.SETTINGS.items():
    assert not set(spec["source"]) & set(spec["target"]), name
    if name.endswith("2cls"):
      assert set(spec["target"]) <= cls, name
  assert set(wordnet_gym.SETTINGS["wn_cls2cls"]["source"]) <= cls
  assert not set(wordnet_gym.SETTINGS["wn_nocls2cls"]["source"]) & cls
  assert (
    not set(
      wordnet_gym.SETTINGS["wn_nocls2nocls"]["source"] + wordnet_gym.SETTINGS["wn_nocls2nocls"]["target"]
    )
    & cls
  )
  assert (SHIPPED / wordnet_gym.LICENSE_FILE).read_text().startswith("WordNet Release 3.0")


def test_gym_registers_with_the_settings_registry():
  registered_before = "wordnet" in settings.gyms()
  try:
    wordnet_gym.register(SHIPPED)
    setting = settings.get_setting("wn_cls2cls")
    assert setting.target == tuple(wordnet_gym.SETTINGS["wn_cls2cls"]["target"])
    assert setting.gym == "wordnet" and not setting.overlap
    assert settings.metric_for_task("wn-antonym_pair") == "ACC"
    assert settings.metric_for_task("wn-define_word") == "QA-F1"
    assert settings.is_classification("wn-pos_in_context") is True
    assert settings.is_classification("wn-example_cloze") is False
    loaded = settings.load_setting({"source": ["wn-synonym_pair"], "target": ["wn-antonym_pair"]})
    assert loaded.source == ("wn-synonym_pair",)
  finally:
    if not registered_before:  # leave the registry as this test found it
      settings.unregister_gym("wordnet")


# --- the reader and the builders on a tiny hand-written database (wndb(5WN) lines) -----------------------

_TINY = {
  "data.noun": [
    '00000010 05 n 01 dog 0 001 @ 00000020 n 0000 | a domesticated canine; "the dog barked all night"',
    "00000020 05 n 02 canine 0 canid 0 000 | a mammal with long pointed teeth",
  ],
  "data.verb": [
    '00000010 38 v 01 walk 0 000 01 + 02 00 | use one\'s feet to advance; "we walked to the store"',
    '00000020 35 v 01 hit 0 000 01 + 08 00 | deal a blow to; "He hit her hard"',
  ],
  "data.adj": [
    '00000010 00 a 01 hot 0 002 ! 00000020 a 0101 & 00000030 s 0000 | used of physical heat; "a hot stove"',
    "00000020 00 a 01 cold 0 001 ! 00000010 a 0101 | having a low temperature",
    "00000030 00 s 02 scorching 0 galore(ip) 0 001 & 00000010 a 0000 | hot enough to burn",
  ],
  "data.adv": ['00000010 02 r 01 quickly 0 000 | with speed; "she answered quickly"'],
}


@pytest.fixture
def tiny(tmp_path):
  for name, lines in _TINY.items():
    header = "  1 This software and database is being provided to you, the LICENSEE, by Princeton\n"
    (tmp_path / name).write_text(header + "\n".join(lines) + "\n")
  wordnet._load.cache_clear()
  index = wordnet_gym.WordNetIndex(wordnet.load_wordnet(tmp_path))
  yield index
  wordnet._load.cache_clear()


def test_reader_parses_the_documented_line_format(tiny):
  dog = tiny[("n", 10)]
  assert dog.lexname == "noun.animal" and dog.lemmas == ("dog",) and dog.pos == "n"
  assert dog.related(wordnet.HYPERNYM) == [("n", 20)]
  assert dog.definition == "a domesticated canine"
  assert dog.examples == ("the dog barked all night",)
  assert tiny[("n", 20)].lemmas == ("canine", "canid")
  walk = tiny[("v", 10)]
  assert walk.lexname == "verb.motion" and walk.verb_frames == ((2, 0),)
  scorching = tiny[("a", 30)]
  assert scorching.satellite and scorching.lemmas == ("scorching", "galore")  # "(ip)" marker dropped
  assert scorching.related(wordnet.SIMILAR) == [("a", 10)]  # pos "a" although the line says "s"
  hot = tiny[("a", 10)]
  assert [(p.symbol, p.target, p.source_word, p.target_word) for p in hot.pointers] == [
    ("!", ("a", 20), 1, 1),
    ("&", ("a", 30), 0, 0),
  ]
  assert tiny[("r", 10)].lexname == "adv.all"


def test_task_builders_give_the_hand_derived_examples(tiny):
  sep = " [SEP] "
  assert wordnet_gym._antonym_of_adjective(tiny) == [
    (f"adjective: hot{sep}definition: used of physical heat", ("cold",)),
    (f"adjective: cold{sep}definition: having a low temperature", ("hot",)),
  ]
  assert wordnet_gym._antonym_pair(tiny) == [
    (f"word 1: hot{sep}word 2: cold", ("opposite",)),
    (f"word 1: hot{sep}word 2: scorching", ("similar",)),
    (f"word 1: cold{sep}word 2: hot", ("opposite",)),
  ]
  assert wordnet_gym._hypernym_of_word(tiny) == [
    (f"word: dog{sep}definition: a domesticated canine", ("canine", "canid"))
  ]
  assert wordnet_gym._verb_transitivity(tiny) == [
    (f"verb: walk{sep}definition: use one's feet to advance", ("intransitive",)),
    (f"verb: hit{sep}definition: deal a blow to", ("transitive",)),
  ]
  # "we walked to the store" lacks the exact word "walk"; "a hot stove" is too short for a cloze.
  assert wordnet_gym._pos_in_context(tiny) == [
    (f"sentence: the dog barked all night{sep}word: dog", ("noun",)),
    (f"sentence: He hit her hard{sep}word: hit", ("verb",)),
    (f"sentence: a hot stove{sep}word: hot", ("adjective",)),
    (f"sentence: she answered quickly{sep}word: quickly", ("adverb",)),
  ]
  assert wordnet_gym._example_cloze(tiny) == [
    ("sentence: the ___ barked all night", ("dog",)),
    ("sentence: He ___ her hard", ("hit",)),
  ]
  assert wordnet_gym._synonym_of_word(tiny) == [
    (f"word: canine{sep}definition: a mammal with long pointed teeth", ("canid",)),
    (f"word: scorching{sep}definition: hot enough to burn", ("galore",)),
  ]


def test_register_refuses_a_stale_gym_directory(tmp_path):
  (tmp_path / wordnet_gym.METRICS_FILE).write_text(json.dumps({"wn-old_task": "EM"}))
  (tmp_path / wordnet_gym.SETTINGS_FILE).write_text(json.dumps(wordnet_gym.SETTINGS))
  with pytest.raises(ValueError, match="stale"):
    wordnet_gym.register(tmp_path)


def test_missing_database_names_the_package_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
    wordnet.load_wordnet(tmp_path)


def test_unknown_task_is_refused_early(tmp_path):
  with pytest.raises(ValueError, match="not tasks of the WordNet gym"):
    wordnet_gym.write_wordnet_gym(tmp_path, tasks=["wn-no_such_task"])


# --- reproducibility from the real database --------------------------------------------------------------

# One task of each kind of builder (category, word pair, sentence, generation): the full gym takes about
# a minute to rebuild on a shared 2-core machine, these four about ten seconds.
_REGENERATED = ["wn-noun_category_living", "wn-antonym_pair", "wn-example_cloze", "wn-define_word"]


def _installed_database_or_skip() -> Path:
  try:
    path = wordnet.wordnet_dir()
  except FileNotFoundError as e:
    pytest.skip(f"WordNet is not installed here ({e}); the shipped gym is checked above")
  info = json.loads((SHIPPED / wordnet_gym.INFO_FILE).read_text())
  if wordnet_gym.database_fingerprint(path) != info["database_sha256"]:
    pytest.skip(f"{path} holds another WordNet build than the one the shipped gym was made from")
  return path


def test_regenerating_from_wordnet_gives_the_shipped_bytes(tmp_path):
  path = _installed_database_or_skip()
  wordnet_gym.write_wordnet_gym(tmp_path, path, tasks=_REGENERATED)
  for task in _REGENERATED:
    for shipped_file in sorted((SHIPPED / task).iterdir()):
      assert (tmp_path / task / shipped_file.name).read_bytes() == shipped_file.read_bytes(), shipped_file
  for name in (wordnet_gym.METRICS_FILE, wordnet_gym.SETTINGS_FILE, wordnet_gym.LICENSE_FILE):
    assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
