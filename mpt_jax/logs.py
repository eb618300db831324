"""Metrics to JSONL (one object a line, easy to read back) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

from mpt_jax import parallel, paths


class MetricWriter:
  """Writes scalar metrics under `directory`: metrics.jsonl and TensorBoard events (process 0 only).

  A URL directory (gs://...) is written through a local mirror (mpt_jax/paths.py: object stores cannot
  append), uploaded every `upload_every` writes and on close."""

  def __init__(self, directory: str | os.PathLike, upload_every: int = 50):
    self._active = parallel.is_primary()
    self._jsonl = self._tb = self._mirror = None
    self._upload_every, self._writes = upload_every, 0
    if self._active:
      self._mirror = paths.LocalMirror(directory)
      self._jsonl = open(os.path.join(self._mirror.local, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
      from tensorboardX import SummaryWriter  # deferred: only runs that log need it

      self._tb = SummaryWriter(self._mirror.local, flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
    if not self._active:
      return
    scalars = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
    try:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    except OSError as error:  # a full disk says only "No space left on device": name the file
      raise OSError(error.errno, f"writing {self._jsonl.name}: {error.strerror or error}") from error
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._writes += 1
    if paths.is_url(self._mirror.path) and self._writes % self._upload_every == 0:
      self._tb.flush()
      self._mirror.upload()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
      self._mirror.upload()


class RunWriters:
  """One MetricWriter per run, in `directory`/<run name>: TensorBoard draws every run as its own line of
  the same chart (tags are the same in each), to be picked out by name (`seed13_lr0.3`)."""

  def __init__(self, directory: str | os.PathLike, names):
    self._writers = {name: MetricWriter(paths.join(os.fspath(directory), name)) for name in names}

  def write(self, step: int, metrics_by_run: Mapping[str, Mapping[str, float]]) -> None:
    for name, metrics in metrics_by_run.items():
      if metrics:
        self._writers[name].write(step, metrics)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def _scalar(value) -> float:
  return float(np.asarray(jax.device_get(value), np.float64).mean())


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file."""
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def read_events(directory: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of the TensorBoard event files in a local `directory`, read without
  TensorFlow (TFRecord framing: length, its CRC, the Event proto, its CRC; tensorboardX's protos)."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2

  files = sorted(glob.glob(os.path.join(os.fspath(directory), "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"{directory}: no TensorBoard event file (events.out.tfevents.*)")
  out: dict[str, list[tuple[int, float]]] = {}
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out
