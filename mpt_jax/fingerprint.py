"""What a stage's results depend on, so that a rerun in the same workdir never reuses or relabels work done
with another config.

A stage (upstream; each downstream task) has a fingerprint: every config key that can change its results
(all but `HARMLESS`; downstream depends on upstream through the prompt upstream made, so each stage leaves
the other's own keys out) and hashes of what some keys only point to: the data files' contents and the
initial prompt. It is written to `<stage dir>/fingerprint.json` when the stage starts, and its hash goes
into the stage's checkpoints, prompts and results. A rerun whose fingerprint differs is refused before any
compute, naming the keys and the fix. The one change allowed is upstream's learning rates after a
divergence: the run then continues from its last good checkpoint with the new rates, and the record keeps
which rates trained which steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpt_jax import config as config_lib, paths, resources

FILE = "fingerprint.json"
DATA = "(data)"  # hash of the stage's data files (task names, inputs, answers)
INITIAL_PROMPT = "(initial prompt)"  # hash of the prompt downstream starts from (None: each task's name)
UPSTREAM_LEARNING_RATES = ("upstream.lr", "upstream.inner_lr")  # may change after a divergence
# Which random bits a key draws (JAX's `jax_threefry_partitionable`, set by JAX_THREEFRY_PARTITIONABLE): the
# same config draws other dropout masks under the other kind. Not a config key, so recorded beside them.
RANDOM_BITS = "(random bits)"
# The hub commit of the model's weights (`hf.snapshot_commit`: a hub id's snapshot; None for a directory,
# known by its path): a hub id's revision ("main") moves, and a month later may name other weights.
MODEL_SNAPSHOT = "(model snapshot)"
# Which dropout masks an rng draws (mpt_jax/model/dropout.py's MASKS): the code, not the config, decides.
# Recorded only where dropout is on (`pipeline.dropout_masks`).
DROPOUT_MASKS = "(dropout masks)"
# Recorded from 2026-11-30 (random bits) and 2026-12-06 (model snapshot) on; what an earlier record was
# made with is unknown, so a record without them is not compared on them (and keeps its old hash).
UNRECORDED_BEFORE = (RANDOM_BITS, MODEL_SNAPSHOT)

# Keys that cannot change what a stage computes, and why. Every other key (including keys added later)
# is part of the fingerprint.
HARMLESS = {
  "upstream.log_every": "logging",
  "upstream.checkpoint_every": "a resumed run is bitwise the uninterrupted one, wherever it stopped",
  "cache_dir": "where a cache keyed by content lives",
  "compilation_cache": "whether compiled programs are kept on disk (the same programs either way)",
  "compilation_cache_dir": "where compiled programs are kept (keyed by the program itself)",
  "pt_results": "only the setting table's gain over PT, recomputed on every run",
  "stages": "which stages run",
  "downstream.tasks": "which target tasks run: each task's results stand alone",
  "downstream.prompt_tune_sources": "whether the source tasks are prompt-tuned too",
  "downstream.source_seeds": "which seeds' files the source grids read: their content is fingerprinted",
  "data_dir": "where the data are: their content is fingerprinted",
  "gym": "where the data are: their content is fingerprinted",
  "setting": "which tasks: their names and data are fingerprinted",
  "setting_file": "which tasks: their names and data are fingerprinted",
  "init_prompt": "where the initial prompt is: its content is fingerprinted",
  "model_revision": "which hub commit of the model: the commit it resolves to is fingerprinted",
  "remat_layers": "the same function, recomputed in the backward pass",
  "upstream.remat_inner": "the same function, recomputed in the backward pass",
  # (MTL's dropout masks are drawn per device: another draw of the same distribution.)
  "num_devices": "the same data-parallel step, split over more or fewer devices",
  "model_parallel": "the same step, with the frozen weights split over more or fewer devices",
  # The batch only sets the prompt's position under after_padding (see `stage_keys`).
  "downstream.eval_batch_size": "evaluation batches score each example on its own",
  "downstream.runs_at_once": "the same runs, computed in groups of another size",
}

# Keys added to the config (or to the fingerprint) after records were written, with the value every
# earlier run computed with: a record without such a key was made with that value (so a workdir, or a grid
# copied from one, written before the key existed stays reusable under it, and is refused under any other).
ADDED_KEYS = {
  "data.direction": "direct",  # 2026-11-30: before it, every task was trained and scored direct
  "downstream.objective": "likelihood",  # 2026-11-30: before it, every prompt trained the token loss
  "downstream.calibration": "none",  # 2026-11-30: before it, rank classification took the raw scores
  "prompt.init_token": "</s>",  # 2026-11-30: before it, no init read it
  # 2026-12-08 (not a config key: what the code drew): before it, other masks for the same rng
  DROPOUT_MASKS: "threefry-2x32 16-bit draws keyed by jax.random.bits of the site rng (until 2026-12-07: "
  "flax nn.Dropout)",
}

# Where the shipped small T5 was before it moved into the package (2026-12-06: <checkout>/assets/small_t5,
# now <checkout>/mpt_jax/assets/small_t5): a record made with it there was made with the same files.
MOVED_SMALL_T5 = str(resources.PACKAGE_DIR.parent / "assets" / "small_t5")


def stage_keys(config, stage: str) -> dict[str, Any]:
  """The config keys that can change the results of `stage` ("upstream" or "downstream"), as JSON."""
  if stage not in ("upstream", "downstream"):
    raise ValueError(f"stage {stage!r}: expected 'upstream' or 'downstream'")
  other = "downstream." if stage == "upstream" else "upstream."
  keys = {}
  for key, value in config_lib.flatten(config).items():
    harmless = key in HARMLESS and not (
      key == "downstream.eval_batch_size" and config.prompt.placement == "after_padding"
    )
    if not harmless and not key.startswith(other):
      keys[key] = value
  return _as_json(keys)


def random_bits() -> str:
  """The kind of random bits this process draws: "threefry_partitionable" (JAX's default) or "threefry"."""
  import jax

  return "threefry_partitionable" if jax.config.jax_threefry_partitionable else "threefry"


def _as_json(value):
  return json.loads(json.dumps(value, sort_keys=True))


def digest(value) -> str:
  """A short stable hash of a JSON-able value or of an array's bytes (with its dtype and shape)."""
  h = hashlib.sha256()
  if isinstance(value, np.ndarray):
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  else:
    h.update(json.dumps(value, sort_keys=True).encode())
  return h.hexdigest()[:16]


def data_digest(task_data: Mapping[str, Any]) -> str:
  """The hash of tasks' files as read (task, seed, split, inputs, answers), whatever directory they are in."""
  content = []
  for task in sorted(task_data):
    for (seed, split), data in sorted(task_data[task].splits.items()):
      content.append([task, seed, split, list(data.inputs), [list(a) for a in data.answers]])
  return digest(content)


@dataclasses.dataclass
class Record:
  """<stage dir>/fingerprint.json: the stage's fingerprint, and (upstream) its divergences and the
  learning rates each span of steps was trained with."""

  keys: dict[str, Any]
  learning_rates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  divergences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  diverged: bool = False  # the last divergence was not yet followed by a rerun with lower rates

  @property
  def hash(self) -> str:
    return digest(self.keys)

  @classmethod
  def load(cls, directory: str) -> Record | None:
    path = paths.join(directory, FILE)
    if not paths.exists(path):
      return None
    try:
      fields = json.loads(paths.read_text(path))
      fields.pop("fingerprint", None)
      return cls(**fields)
    except (json.JSONDecodeError, TypeError) as error:
      raise ValueError(
        f"{path} is unreadable ({error}); it records the config this directory's work was "
        f"made with: use a fresh --workdir"
      ) from None

  def save(self, directory: str) -> None:
    paths.makedirs(directory)
    record = {"fingerprint": self.hash, **dataclasses.asdict(self)}
    paths.write_text(paths.join(directory, FILE), json.dumps(record, indent=1, sort_keys=True) + "\n")


def has_work(directory: str) -> bool:
  """Whether the stage directory holds anything a rerun would reuse: a checkpoint, a prompt, results."""
  if not paths.isdir(directory):
    return False
  for name in paths.listdir(directory):
    if name in (FILE, "logs") or name.startswith(FILE):
      continue
    if name == "checkpoints":
      if any(e.isdigit() for e in paths.listdir(paths.join(directory, name))):
        return True
      continue
    return True
  return False


@dataclasses.dataclass(frozen=True)
class Difference:
  key: str
  stored: Any
  current: Any


def differences(
  stored: Mapping[str, Any], current: Mapping[str, Any], unknown: Sequence[str] = ()
) -> list[Difference]:
  """Keys whose values differ (a key missing on one side counts, except a key of ADDED_KEYS missing from
  the stored record: it was made with that key's value, and a key of UNRECORDED_BEFORE missing from it:
  what it was made with is unknown); keys in `unknown` are not compared."""
  missing = object()
  stored = {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **stored}
  if stored.get("model") == MOVED_SMALL_T5 and current.get("model") == str(resources.SMALL_T5_DIR):
    stored = {**stored, "model": current["model"]}  # the same files, moved
  unknown = {*unknown, *(k for k in UNRECORDED_BEFORE if k not in stored)}
  return [
    Difference(key, stored.get(key, missing), current.get(key, missing))
    for key in sorted(set(stored) | set(current))
    if key not in unknown and stored.get(key, missing) != current.get(key, missing)
  ]


def _show(value) -> str:
  return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def restore_flags(diffs: Sequence[Difference]) -> str:
  """The command-line flags that set the config keys among `diffs` back to their stored values."""
  flags = []
  for d in diffs:
    if d.key == RANDOM_BITS and d.stored in ("threefry", "threefry_partitionable"):
      flags.append(f"JAX_THREEFRY_PARTITIONABLE={int(d.stored == 'threefry_partitionable')}")
    if d.key == MODEL_SNAPSHOT and isinstance(d.stored, str):  # the hub commit it was made with, pinned
      flags.append(f"--config.model_revision={d.stored}")
    if d.key.startswith("(") or not isinstance(d.stored, (str, int, float, bool, list)):
      continue
    value = repr(tuple(d.stored)) if isinstance(d.stored, list) else str(d.stored)
    flags.append(shlex.quote(f"--config.{d.key}={value}"))
  return " ".join(flags)


class WorkdirConflict(ValueError):
  """Work in the workdir was made with another config: reusing it would relabel or mix results."""


@dataclasses.dataclass(frozen=True)
class Check:
  """The outcome of comparing a stage directory with the current fingerprint."""

  record: Record | None  # the stored record (None: none, or one without work behind it)
  problem: str | None = None  # why the rerun is refused
  new_learning_rates: dict[str, Any] | None = None  # accepted lower rates after a divergence


def check_stage(
  directory: str, current: Mapping[str, Any], *, what: str, fix: str, unknown: Sequence[str] = ()
) -> Check:
  """Compares the record in `directory` with `current` (the stage's fingerprint keys).

  A record without work behind it (a run that stopped before its first checkpoint) is not binding.
  After a recorded divergence, changed upstream learning rates (and nothing else) are accepted.
  """
  work = has_work(directory)
  record = Record.load(directory) if paths.isdir(directory) else None
  if not work:
    return Check(None)
  if record is None:
    return Check(
      None,
      f"{directory} holds work of an mpt-jax without config fingerprints (or its {FILE} "
      f"was removed), so what it was made with is unknown: {fix}.",
    )
  diffs = differences(record.keys, current, unknown)
  if record.diverged:
    changed = {d.key: d.current for d in diffs if d.key in UPSTREAM_LEARNING_RATES}
    others = [d for d in diffs if d.key not in UPSTREAM_LEARNING_RATES]
    last = record.divergences[-1]
    if not diffs:
      return Check(
        record,
        f"{what} diverged at step {last['step']} with "
        f"{_rates(last['learning_rates'])} ({last['reason']}); the same rates would diverge "
        f"again. Rerun with a lower --config.upstream.lr (or upstream.inner_lr): it "
        f"continues from step {last['resume_step']}, the last good checkpoint, with the "
        f"new rate.",
      )
    if not others:
      return Check(record, new_learning_rates=changed)
    diffs = others
  if not diffs:
    return Check(record)
  lines = "\n".join(f"    {d.key}: {_show(d.stored)} -> {_show(d.current)}" for d in diffs)
  back = restore_flags(diffs)
  back = f", or rerun with the values it was made with: {back}" if back else ""
  return Check(
    record, f"{what} was made with another config; these keys differ (then -> now):\n{lines}\n  {fix}{back}."
  )


def _rates(rates: Mapping[str, Any]) -> str:
  return ", ".join(f"{key}={value:g}" for key, value in rates.items())
