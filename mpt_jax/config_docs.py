"""Every config key with its default and meaning, read from the comments beside the keys where the config
declares them (`config.base_config` and its section builders, `config.SECTIONS`: the one place a key is
documented): `mpt-jax config [NAME[:preset]]`.

A key's meaning is its line's trailing comment, else the comment block right above it; a test checks
that every key of every method's config has one, so a new key without a comment fails CI.
"""

from __future__ import annotations

import argparse
import inspect
import io
import re
import sys
import tokenize
from collections.abc import Mapping, Sequence


def key_meanings() -> dict[str, str]:
  """{dotted key: its comment, as one line} for every key base_config and its section builders
  (`config.SECTIONS`) assign with a comment."""
  from mpt_jax import config as config_lib

  meanings = assigned_meanings(inspect.getsource(config_lib.base_config), "c", "")
  for prefix, builder, _ in config_lib.SECTIONS:
    meanings.update(assigned_meanings(inspect.getsource(builder), "s", f"{prefix}." if prefix else ""))
  return meanings


def assigned_meanings(source: str, variable: str, prefix: str) -> dict[str, str]:
  """{prefix + key: its comment} of each `variable.key = ...` line of `source` with a comment: the line's
  own trailing comment, else the comment block right above it."""
  assignment = re.compile(rf"^\s*{variable}((?:\.\w+)+)\s*=(?!=)")
  lines = source.splitlines()
  comments: dict[int, str] = {}  # line number -> its comment
  own_line: set[int] = set()  # lines that hold only a comment
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row = token.start[0]
      comments[row] = token.string.lstrip("#").strip()
      if not lines[row - 1][: token.start[1]].strip():
        own_line.add(row)
  meanings = {}
  for row, line in enumerate(lines, start=1):
    match = assignment.match(line)
    if match is None or "ConfigDict()" in line or "_keys(" in line:
      continue
    key = prefix + match.group(1)[1:]
    if row in comments and row not in own_line:
      meanings[key] = comments[row]
      continue
    block, above = [], row - 1
    while above in own_line:
      block.insert(0, comments[above])
      above -= 1
    if block:
      meanings[key] = " ".join(block)
  return meanings


def first_sentence(text: str) -> str:
  """Up to the first full stop followed by a space (or the whole text)."""
  match = re.search(r"(?<!e\.g)(?<!i\.e)(?<! al)\.\s", text + " ")
  return text[: match.start() + 1] if match else text


def describe(config, meanings: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
  """(key, its value in `config`, its meaning) for every key of `config`, in the config's order."""
  from mpt_jax import config as config_lib

  meanings = key_meanings() if meanings is None else meanings
  return [(key, repr(value), meanings.get(key, "")) for key, value in config_lib.flatten(config).items()]


def render(config, full: bool = False) -> str:
  """The lines `mpt-jax config` prints: `key = value  # meaning` (first sentence unless `full`)."""
  rows = describe(config)
  width = max(len(f"{k} = {v}") for k, v, _ in rows)
  out = []
  for key, value, meaning in rows:
    text = meaning if full else first_sentence(meaning)
    out.append(f"{f'{key} = {value}':<{width}}  # {text}" if text else f"{key} = {value}")
  return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="mpt-jax config",
    description="Every config key with its value in a config (default: the study's MAML on cls2cls) and "
    "its meaning; override any with --config.KEY=VALUE in a run (mpt-jax run) or a study (mpt-jax study).",
  )
  parser.add_argument("config", nargs="?", default="maml_cls2cls", help="a config: NAME[:preset] or a path")
  parser.add_argument("--full", action="store_true", help="each key's whole comment, not its first sentence")
  args = parser.parse_args(argv)
  from mpt_jax import main as main_lib

  try:
    config = main_lib.load_config(args.config)
  except ValueError as error:
    sys.stderr.write(f"mpt-jax config: {error}\n")
    return 1
  sys.stdout.write(f"# {args.config}: key = value  # meaning (mpt_jax/config.py)\n")
  sys.stdout.write(render(config, full=args.full))
  return 0
