"""A reader of the Princeton WordNet 3.0 database files (format: wndb(5WN)), with no dependency.

Get the files with `apt-get install wordnet-base` (Debian/Ubuntu: /usr/share/wordnet/data.{noun,verb,adj,adv})
or point `MPT_WORDNET_DIR` / the `wordnet_dir` arguments at any directory holding them (the `dict/` folder of
the WordNet 3.0 tarball). Only the four `data.*` files are read: each line is one synset with its lemmas,
its lexicographer file (a category such as noun.animal), its pointers to other synsets or words
(hypernym, antonym, similar, ...), and its gloss (a definition, then quoted example sentences).

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved (license: WORDNET_LICENSE.txt
beside the generated assets).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}

# lexnames(5WN): the lexicographer file of a synset, by the two-digit number in its data line.
LEXNAMES = (
  "adj.all",
  "adj.pert",
  "adv.all",
  "noun.Tops",
  "noun.act",
  "noun.animal",
  "noun.artifact",
  "noun.attribute",
  "noun.body",
  "noun.cognition",
  "noun.communication",
  "noun.event",
  "noun.feeling",
  "noun.food",
  "noun.group",
  "noun.location",
  "noun.motive",
  "noun.object",
  "noun.person",
  "noun.phenomenon",
  "noun.plant",
  "noun.possession",
  "noun.process",
  "noun.quantity",
  "noun.relation",
  "noun.shape",
  "noun.state",
  "noun.substance",
  "noun.time",
  "verb.body",
  "verb.change",
  "verb.cognition",
  "verb.communication",
  "verb.competition",
  "verb.consumption",
  "verb.contact",
  "verb.creation",
  "verb.emotion",
  "verb.motion",
  "verb.perception",
  "verb.possession",
  "verb.social",
  "verb.stative",
  "verb.weather",
  "adj.ppl",
)

# Pointer symbols used by the gym and the corpus (wninput(5WN) lists them all).
ANTONYM, HYPERNYM, INSTANCE_HYPERNYM, SIMILAR, ATTRIBUTE = "!", "@", "@i", "&", "="
DERIVATION, PERTAINYM, ENTAILMENT, PART_HOLONYM, TOPIC_DOMAIN = "+", "\\", "*", "#p", ";c"

# Shipped beside every asset derived from the database, as the WordNet 3.0 license asks.
WORDNET_LICENSE = """\
WordNet Release 3.0

This software and database is being provided to you, the LICENSEE, by Princeton University under the
following license. By obtaining, using and/or copying this software and database, you agree that you
have read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and database and its documentation for
any purpose and without fee or royalty is hereby granted, provided that you agree to comply with the
following copyright notice and statements, including the disclaimer, and that the same appear on ALL
copies of the software, database and documentation, including modifications that you make for
internal use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE
USE OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in advertising or publicity pertaining
to distribution of the software and/or database. Title to copyright in this software, database and
any associated documentation shall at all times remain with Princeton University and LICENSEE agrees
to preserve same.
"""

_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective position markers: "galore(ip)"
_QUOTED = re.compile(r'"([^"]+)"')


@dataclasses.dataclass(frozen=True)
class Pointer:
  symbol: str
  target: tuple[str, int]  # (file pos "n"/"v"/"a"/"r", offset) of the target synset
  source_word: int  # 1-based index into the source synset's lemmas; 0: the pointer is between synsets
  target_word: int  # likewise in the target synset


@dataclasses.dataclass(frozen=True)
class Synset:
  key: tuple[str, int]  # (file pos, byte offset): unique within the database
  pos: str  # "n", "v", "a", "r" (adjective satellites "s" are folded into "a")
  satellite: bool
  lexname: str  # e.g. "noun.animal"
  lemmas: tuple[str, ...]  # words as written in text: underscores become spaces, markers dropped
  pointers: tuple[Pointer, ...]
  verb_frames: tuple[tuple[int, int], ...]  # (frame number, word index or 0 for all words)
  definition: str
  examples: tuple[str, ...]

  def related(self, symbol: str) -> list[tuple[str, int]]:
    """Targets of the synset-level (not word-level) pointers with this symbol."""
    return [p.target for p in self.pointers if p.symbol == symbol and p.source_word == 0]


def wordnet_dir(path: str | os.PathLike | None = None) -> Path:
  """The WordNet database directory: `path`, else $MPT_WORDNET_DIR, else /usr/share/wordnet; checked."""
  path = Path(path or os.environ.get("MPT_WORDNET_DIR") or DEFAULT_WORDNET_DIR)
  missing = [name for name in DATA_FILES.values() if not (path / name).is_file()]
  if missing:
    raise FileNotFoundError(
      f"WordNet database not found: {path} lacks {', '.join(missing)}. Install it with "
      f"`apt-get install wordnet-base` (gives {DEFAULT_WORDNET_DIR}), or set MPT_WORDNET_DIR to a "
      f"directory holding the WordNet 3.0 data.noun/data.verb/data.adj/data.adv files."
    )
  return path


def _lemma_text(word: str) -> str:
  return _MARKER.sub("", word).replace("_", " ")


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
  """`definition; "example 1"; "example 2"` -> (definition, examples)."""
  head, quote, rest = gloss.partition('"')
  definition = head.strip().rstrip(";").strip()
  examples = tuple(e.strip() for e in _QUOTED.findall(quote + rest) if e.strip())
  return definition, examples


def parse_data_line(line: str, file_pos: str) -> Synset:
  """One synset line of a data.* file (wndb(5WN): offset lex_filenum ss_type w_cnt word lex_id ...)."""
  fields, _, gloss = line.partition(" | ")
  tok = fields.split()
  offset, lex_filenum, ss_type = int(tok[0]), int(tok[1]), tok[2]
  w_cnt = int(tok[3], 16)
  lemmas = tuple(_lemma_text(tok[4 + 2 * i]) for i in range(w_cnt))
  i = 4 + 2 * w_cnt
  p_cnt = int(tok[i])
  i += 1
  pointers = []
  for _ in range(p_cnt):
    symbol, target_offset, target_pos, source_target = tok[i : i + 4]
    i += 4
    target_pos = "a" if target_pos == "s" else target_pos
    pointers.append(
      Pointer(
        symbol, (target_pos, int(target_offset)), int(source_target[:2], 16), int(source_target[2:], 16)
      )
    )
  frames = []
  if file_pos == "v" and i < len(tok):
    f_cnt = int(tok[i])
    i += 1
    for _ in range(f_cnt):  # "+ f_num w_num"
      frames.append((int(tok[i + 1]), int(tok[i + 2], 16)))
      i += 3
  definition, examples = split_gloss(gloss.strip())
  return Synset(
    key=(file_pos, offset),
    pos=file_pos,
    satellite=ss_type == "s",
    lexname=LEXNAMES[lex_filenum],
    lemmas=lemmas,
    pointers=tuple(pointers),
    verb_frames=tuple(frames),
    definition=definition,
    examples=examples,
  )


@functools.lru_cache(maxsize=2)
def _load(path: str) -> dict[tuple[str, int], Synset]:
  synsets = {}
  for file_pos, name in DATA_FILES.items():
    with open(Path(path) / name, encoding="utf-8") as f:
      for line in f:
        if line.startswith("  "):  # the license header lines start with two spaces
          continue
        synset = parse_data_line(line.rstrip("\n"), file_pos)
        synsets[synset.key] = synset
  return synsets


def load_wordnet(path: str | os.PathLike | None = None) -> dict[tuple[str, int], Synset]:
  """All synsets of the database, keyed by (file pos, offset), in file order (noun, verb, adj, adv)."""
  return _load(str(wordnet_dir(path)))
