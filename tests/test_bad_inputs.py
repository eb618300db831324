"""docs/BAD_INPUTS.md, reproduced row by row, and the behaviour behind its hardest rows: a changed config
never reuses or relabels a workdir's work, a divergence leaves a workdir a lower learning rate recovers,
a diverging downstream run does not take the healthy ones with it, a damaged checkpoint is stepped over.

Each reproduction failed before issue 14 in the way the issue saw (exit 0 with a relabelled or stale
table, a stuck workdir, a bare AttributeError, a TensorStore dump, ...).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers_lease
import helpers_t5
from mpt_jax import config as config_lib, fingerprint, gyms, lease, optim, paths, pipeline, resources, results
from mpt_jax.model import hf

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates (tests/helpers_t5.py)

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "docs" / "BAD_INPUTS.md"


# --- runs on a tiny model and the synthetic gym ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  return str(helpers_t5.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_t5")))


def tiny_config(checkpoint: str, method: str = "maml", **overrides):
  """The `tiny` preset on the synthetic gym's smallest setting with a tiny T5; overrides by dotted key."""
  config = config_lib.base_config(method, "synth_mini", "tiny")
  config.gym, config.model, config.dropout_rate = "synthetic", checkpoint, 0.0
  config.upstream.num_steps = 4
  return with_keys(config, overrides)


def with_keys(config, overrides: dict):
  """The config with `{"dotted.key": value}` set."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def error_of(call, kind=Exception) -> str:
  with pytest.raises(kind) as caught:
    call()
  return str(caught.value)


def snapshot(directory: Path) -> dict[str, int]:
  """{file: mtime}: to check that a refused rerun wrote nothing."""
  return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_maml(tmp_path_factory, checkpoint) -> Path:
  """A finished MAML workdir (4 upstream steps, checkpoints every 2; the tiny grid on one target task)."""
  workdir = tmp_path_factory.mktemp("study") / "maml"
  pipeline.run(tiny_config(checkpoint), str(workdir))
  return workdir


# --- the catalogue -----------------------------------------------------------------------------------------


def catalogue_rows() -> dict[str, str]:
  """{case: the excerpt its message must contain} from the tables of docs/BAD_INPUTS.md."""
  rows = {}
  for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
    match = re.match(r"^\| `([a-z0-9-]+)` \|.*\|(.*)\|$", line)
    if match:
      rows[match.group(1)] = re.findall(r"`([^`]+)`", match.group(2))
  return rows


def excerpt_pattern(spans) -> str:
  """The doc's backticked spans of a row, in order, as one regex (`…` matches any text)."""
  return ".*".join(".*".join(re.escape(part) for part in span.split("…")) for span in spans)


def _main(*args, cwd=REPO) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mpt_jax.main", *args], cwd=cwd, capture_output=True, text=True, timeout=600
  )


def config_file_missing(ctx):
  workdir = ctx.tmp / "never"
  done = _main("--config=configs/nothere.py", f"--workdir={workdir}")
  assert done.returncode == 1 and not workdir.exists()
  return done.stderr


def unknown_key(ctx):
  workdir = ctx.tmp / "never"
  done = _main(
    "--config=configs/maml_cls2cls.py:demo", f"--workdir={workdir}", "--config.upstream.learning_rate=0.1"
  )
  assert done.returncode == 1 and not workdir.exists() and "AttributeError" not in done.stderr
  return done.stderr


def unknown_method(ctx):
  # Through the command line: the ConfigError is the whole message (no traceback), exit 1, no workdir.
  workdir = ctx.tmp / "never"
  done = _main(
    "--config=configs/maml_cls2cls.py:demo",
    f"--workdir={workdir}",
    "--config.setting=wn_cls2cls",
    "--config.method=mamll",
  )
  assert done.returncode == 1 and not workdir.exists() and "Traceback" not in done.stderr
  assert refused_config(ctx, **{"method": "mamll"}) in done.stderr  # pipeline.run raises the same
  return done.stderr


def first_order_key(ctx):
  done = _main(
    "--config=configs/maml_cls2cls.py:demo",
    f"--workdir={ctx.tmp / 'never'}",
    "--config.upstream.first_order=True",
  )
  assert done.returncode == 1
  return done.stderr


def refused_config(ctx, kind=config_lib.ConfigError, **overrides) -> str:
  """The error of a run with the tiny config and `overrides` (dotted keys); no workdir is created."""
  workdir = ctx.tmp / "never"
  config = with_keys(tiny_config(ctx.checkpoint), overrides)
  message = error_of(lambda: pipeline.run(config, str(workdir)), kind)
  assert not workdir.exists()
  return message


def write_prompt(path: Path, shape) -> str:
  np.save(path, np.zeros(shape, np.float32))
  return str(path)


def data_problems(ctx):
  data = ctx.tmp / "data"
  gyms.resolve_setting(tiny_config(ctx.checkpoint))  # registers the synthetic gym
  from mpt_jax.data import synthetic

  synthetic.write_synthetic_gym(data, tasks=["synth-sentiment_a", "synth-topic_a", "synth-sentiment_d"])
  next((data / "synth-topic_a").glob("*_13_dev.tsv")).unlink()  # a source task's file
  target = next((data / "synth-sentiment_d").glob("*_100_test.tsv"))
  target.write_text(target.read_text() + "a line without a tab\n")  # a target task's line
  message = refused_config(ctx, kind=ValueError, data_dir=str(data))
  assert "_13_dev.tsv: file not found" in message and "_100_test.tsv:" in message
  return message


def channel_several_answers(ctx):
  data = ctx.tmp / "data"
  gyms.resolve_setting(tiny_config(ctx.checkpoint))  # registers the synthetic gym
  from mpt_jax.data import synthetic

  synthetic.write_synthetic_gym(data, tasks=["synth-sentiment_a", "synth-topic_a", "synth-sentiment_d"])
  train = next((data / "synth-sentiment_d").glob("*_100_train.tsv"))
  lines = train.read_text().splitlines()
  train.write_text("\n".join([lines[0] + "\tpositive"] + lines[1:]) + "\n")  # two answers on one line
  overrides = {"data.direction": "channel", "downstream.decoding": "rank"}
  message = refused_config(ctx, kind=ValueError, data_dir=str(data), **overrides)
  assert train.name in message
  return message


def init_prompt_length(ctx):
  return refused_config(
    ctx, kind=ValueError, init_prompt=write_prompt(ctx.tmp / "p.npy", (8, 16)), **{"prompt.length": 16}
  )


def init_prompt_truncated(ctx):
  path = Path(write_prompt(ctx.tmp / "p.npy", (4, 16)))
  path.write_bytes(path.read_bytes()[:100])
  return refused_config(ctx, kind=ValueError, init_prompt=str(path))


def weights_truncated(ctx):
  broken = ctx.tmp / "broken_t5"
  shutil.copytree(ctx.checkpoint, broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  config = tiny_config(str(broken), "pt")
  return error_of(lambda: pipeline.run(config, str(ctx.tmp / "run")), ValueError)


def init_token_unknown(ctx):
  # Refused when the tokenizer loads, before the first prompt is made or any step compiled.
  config = tiny_config(ctx.checkpoint, "pt", **{"prompt.init": "token", "prompt.init_token": "no such piece"})
  message = error_of(lambda: pipeline.run(config, str(ctx.tmp / "token_run")), ValueError)
  assert not (ctx.tmp / "token_run" / "downstream").exists()
  return message


def devices_do_not_divide(ctx):
  import jax

  assert jax.device_count() == 2  # tests/conftest.py
  return refused_config(ctx, **{"upstream.tasks_per_step": 3})


def rerun(ctx, method="maml", kind=fingerprint.WorkdirConflict, **overrides) -> str:
  """Reruns the finished MAML workdir with another config: refused, and nothing in it rewritten."""
  before = snapshot(ctx.finished)
  message = error_of(
    lambda: pipeline.run(tiny_config(ctx.checkpoint, method, **overrides), str(ctx.finished)), kind
  )
  assert snapshot(ctx.finished) == before
  return message


def other_upstream_lr(ctx):
  message = rerun(ctx, **{"upstream.lr": 0.1})
  # Downstream alone, from the upstream prompt of the same workdir: refused too (the prompt was not made
  # with 0.1, and the results would say it was).
  assert "upstream.lr: 0.5 -> 0.1" in rerun(ctx, **{"upstream.lr": 0.1, "stages": ("downstream",)})
  return message


def other_random_bits(ctx):
  import jax

  assert not jax.config.jax_threefry_partitionable  # tests/conftest.py: the workdir is made with "threefry"
  ctx.finished  # built here, outside the context below, when this case is the module's first to use it
  with jax.threefry_partitionable(True):
    return rerun(ctx)


def older_dropout_masks(ctx):
  """Finished grids whose records predate the dropout-masks entry (made before 2026-12-08): with dropout
  off no mask was drawn and the grid is reused; with dropout on it is refused."""
  task = "synth-sentiment_d"
  data = pipeline.RunData(str(ctx.tmp), source={}, target={task: _NoTaskData()}, source_runs={})

  def finished_before_the_entry(config, workdir: str) -> None:
    stage = Path(workdir) / "downstream" / task
    keys = pipeline.task_fingerprint(config, task, _NoTaskData(), None)
    keys.pop(fingerprint.DROPOUT_MASKS, None)
    fingerprint.Record(keys).save(str(stage))
    (stage / "results.json").write_text("{}")  # finished work, which a rerun would reuse

  off, on = tiny_config(ctx.checkpoint, "pt"), tiny_config(ctx.checkpoint, "pt", dropout_rate=0.1)
  assert fingerprint.DROPOUT_MASKS not in pipeline.task_fingerprint(off, task, _NoTaskData(), None)
  for config, workdir in ((off, str(ctx.tmp / "masks_off")), (on, str(ctx.tmp / "masks_on"))):
    finished_before_the_entry(config, workdir)
  pipeline.check_workdir(off, str(ctx.tmp / "masks_off"), data, None, upstream=False)  # accepted
  return error_of(
    lambda: pipeline.check_workdir(on, str(ctx.tmp / "masks_on"), data, None, upstream=False),
    fingerprint.WorkdirConflict,
  )


def harmless_change(ctx, caplog):
  before = snapshot(ctx.finished)
  with caplog.at_level("INFO"):
    summary = pipeline.run(
      tiny_config(ctx.checkpoint, **{"upstream.log_every": 3, "downstream.eval_batch_size": 2}),
      str(ctx.finished),
    )
  after = snapshot(ctx.finished)
  changed = {f for f in after if after[f] != before.get(f)}
  # Only the run record and the setting table are written again (the table from the same task results).
  assert changed <= {"run_record.json", "results.json", "results.md", "results.csv", "results.png"}, changed
  assert summary == results.load_results(ctx.finished / "results.json")
  return caplog.text


def old_workdir(ctx):
  old = ctx.tmp / "old"
  shutil.copytree(ctx.finished, old)
  for record in old.rglob(fingerprint.FILE):
    record.unlink()
  return error_of(lambda: pipeline.run(tiny_config(ctx.checkpoint), str(old)), fingerprint.WorkdirConflict)


def disk_full(ctx, monkeypatch):
  class FullDisk:
    def __init__(self, *args, **kwargs):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def write(self, text):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(paths, "open", FullDisk, raising=False)  # every write goes through mpt_jax/paths.py
  summary = results.summarize_task("t", [{"task": "t", "seed": 1, "test_score": 0.5}])
  return error_of(lambda: results.write_task_results(summary, ctx.tmp), OSError)


def hub_model_missing(ctx):
  """The command line with a hub id this machine cannot download (offline, an empty hub cache)."""
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(ctx.tmp / "empty_hub")}
  done = subprocess.run(
    [sys.executable, "-m", "mpt_jax.main", "--config=pt_cls2cls:tiny", f"--workdir={ctx.tmp / 'never'}"]
    + [f"--config.data_dir={ctx.tmp}", "--config.model=google/t5-large-lm-adapt"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert done.returncode == 1 and "Traceback" not in done.stderr and not (ctx.tmp / "never").exists()
  (fatal,) = [line for line in done.stderr.splitlines() if line.startswith("FATAL")]
  return fatal


class _NoTaskData:
  splits = {}


def other_model_snapshot(ctx, monkeypatch):
  """A workdir made with a hub id's main at one commit, rerun (a new process) after main moved to another."""
  hub = ctx.tmp / "hub"
  helpers_t5.write_fake_hub(hub, ctx.checkpoint, refs={"main": helpers_t5.FAKE_MAIN_COMMIT})
  monkeypatch.setenv("HF_HUB_CACHE", str(hub))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  config, workdir, task = (
    tiny_config(helpers_t5.FAKE_HUB_ID, "pt"),
    str(ctx.tmp / "hub_run"),
    "synth-sentiment_d",
  )
  data = pipeline.RunData(str(ctx.tmp), source={}, target={task: _NoTaskData()}, source_runs={})
  pipeline.check_workdir(config, workdir, data, None, upstream=False)  # a fresh workdir: accepted
  stage = Path(workdir) / "downstream" / task
  fingerprint.Record(pipeline.task_fingerprint(config, task, _NoTaskData(), None)).save(str(stage))
  (stage / "results.json").write_text("{}")  # finished work, which a rerun would reuse
  helpers_t5.write_fake_hub(hub, ctx.checkpoint, refs={"main": helpers_t5.FAKE_OTHER_COMMIT})
  monkeypatch.setattr(hf, "_RESOLVED", {})  # a new process resolves main again
  return error_of(
    lambda: pipeline.check_workdir(config, workdir, data, None, upstream=False), fingerprint.WorkdirConflict
  )


OTHER_JOB = {"host": "tpu-w-0", "pid": 4242, "start": "2026-12-06T12:00:00Z"}


def workdir_busy(ctx):
  """The command line on a workdir whose lease another job holds (a live heartbeat, another host)."""
  workdir = ctx.tmp / "busy"
  workdir.mkdir()
  held = json.dumps(OTHER_JOB | {"heartbeat_s": time.time() + 600})
  (workdir / lease.FILE).write_text(held)
  done = _main(
    "--config=configs/maml_cls2cls.py:tiny",
    f"--workdir={workdir}",
    f"--config.model={ctx.checkpoint}",
    "--config.gym=synthetic",
    "--config.setting=synth_mini",
  )
  assert done.returncode == 75 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert os.listdir(workdir) == [lease.FILE] and (workdir / lease.FILE).read_text() == held  # nothing written
  (fatal,) = [line for line in done.stderr.splitlines() if line.startswith("FATAL")]
  return fatal


def lease_lost(ctx, monkeypatch):
  """A job whose lease another job took over: its next results write is refused (not made)."""
  monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.02")
  workdir = ctx.tmp / "lost"
  held = lease.take(str(workdir))
  try:
    helpers_lease.lose(held)
    summary = results.summarize_task("t", [{"task": "t", "seed": 1, "test_score": 0.5}])
    message = error_of(lambda: results.write_task_results(summary, workdir / "t"), lease.LeaseLost)
    assert not (workdir / "t" / "results.json").exists()
    return message
  finally:
    lease.release(str(workdir))


def upstream_diverges(ctx):
  return error_of(
    lambda: pipeline.run(tiny_config(ctx.checkpoint, **{"upstream.lr": 1e30}), str(ctx.tmp / "d")),
    FloatingPointError,
  )


REPRODUCTIONS = {
  "config-file-missing": config_file_missing,
  "unknown-key": unknown_key,
  "unknown-method": unknown_method,
  "bad-enums": lambda ctx: refused_config(
    ctx, **{"downstream.decoding": "beem", "prompt.placement": "append", "upstream.optimizer": "adam"}
  ),
  "eval-every-zero": lambda ctx: refused_config(ctx, **{"downstream.eval_every": 0}),
  "bad-learning-rates": lambda ctx: refused_config(
    ctx, **{"downstream.lrs": (0.5, 0.5), "upstream.lr": -1.0}
  ),
  "target-not-in-setting": lambda ctx: refused_config(ctx, **{"downstream.tasks": ("synth-topic_a",)}),
  "no-data": lambda ctx: refused_config(ctx, gym=""),
  "devices-do-not-divide": devices_do_not_divide,
  "model-parallel-does-not-divide": lambda ctx: refused_config(ctx, model_parallel=3),
  "first-order-key": first_order_key,
  "data-problems": data_problems,
  "channel-several-answers": channel_several_answers,
  "channel-without-labels": lambda ctx: refused_config(
    ctx, **{"data.direction": "channel", "downstream.decoding": "greedy"}
  ),
  "label-choice-without-labels": lambda ctx: refused_config(
    ctx, **{"downstream.objective": "label_choice", "downstream.decoding": "beam"}
  ),
  "calibration-without-labels": lambda ctx: refused_config(
    ctx, **{"downstream.calibration": "train_mean", "downstream.decoding": "greedy"}
  ),
  "init-prompt-length": init_prompt_length,
  "init-prompt-width": lambda ctx: refused_config(
    ctx, kind=ValueError, init_prompt=write_prompt(ctx.tmp / "p.npy", (4, 7))
  ),
  "init-prompt-truncated": init_prompt_truncated,
  "weights-truncated": weights_truncated,
  "init-token-unknown": init_token_unknown,
  "model-missing": lambda ctx: refused_config(ctx, model="./no_such_model"),
  "hub-model-missing": hub_model_missing,
  "other-method": lambda ctx: rerun(ctx, "fomaml"),
  "other-upstream-lr": lambda ctx: other_upstream_lr(ctx),
  "other-downstream-lrs": lambda ctx: rerun(ctx, **{"downstream.lrs": (0.4,)}),
  "fewer-steps": lambda ctx: rerun(ctx, **{"upstream.num_steps": 2}),
  "other-seed": lambda ctx: rerun(ctx, seed=1),
  "other-random-bits": lambda ctx: other_random_bits(ctx),
  "older-dropout-masks": older_dropout_masks,
  "other-model-snapshot": None,  # needs monkeypatch: test_catalogue passes it
  "harmless-change": None,  # needs caplog: test_catalogue passes it
  "old-workdir": old_workdir,
  "workdir-busy": workdir_busy,
  "lease-lost": None,  # needs monkeypatch: test_catalogue passes it
  "upstream-diverges": upstream_diverges,
  "same-lr-after-divergence": None,  # the recovery test below shows these three
  "lower-lr-after-divergence": None,
  "downstream-run-diverges": None,
  "checkpoint-unreadable": None,
  "disk-full": None,
}
ROWS_SHOWN_ELSEWHERE = {  # each checked by a test of its own below (they need a run of their own)
  "same-lr-after-divergence": "test_a_lower_learning_rate_recovers_a_diverged_upstream",
  "lower-lr-after-divergence": "test_a_lower_learning_rate_recovers_a_diverged_upstream",
  "downstream-run-diverges": "test_a_diverging_downstream_run_is_marked_failed_and_the_others_go_on",
  "checkpoint-unreadable": "test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one",
}


# --- the behaviour behind the hardest rows -----------------------------------------------------------------


def assert_catalogued(case: str, message: str) -> None:
  """The message contains its row's excerpt of docs/BAD_INPUTS.md: the tests below check the rows of
  ROWS_SHOWN_ELSEWHERE themselves, so that no test depends on another having run first."""
  pattern = excerpt_pattern(catalogue_rows()[case])
  assert re.search(pattern, message, re.DOTALL), f"{case}: {pattern!r} not in:\n{message}"


def test_a_record_written_before_a_key_existed_was_made_with_its_added_value():
  """fingerprint.ADDED_KEYS: a record without downstream.objective (written before the key existed) matches
  the token loss every earlier run trained, and is refused under another objective."""
  current = fingerprint.stage_keys(config_lib.base_config("pt", "cls2cls"), "downstream")
  old = {k: v for k, v in current.items() if k not in fingerprint.ADDED_KEYS}
  assert fingerprint.differences(old, current) == []
  changed = {**current, "downstream.objective": "label_choice"}
  assert [(d.key, d.stored, d.current) for d in fingerprint.differences(old, changed)] == [
    ("downstream.objective", "likelihood", "label_choice")
  ]
  # A key missing from the current side (a key since removed) still counts.
  assert [d.key for d in fingerprint.differences(current, {**old, "data.direction": "direct"})] == sorted(
    set(fingerprint.ADDED_KEYS) & set(current) - {"data.direction"}
  )
  # The calibration, added later still, likewise: a record without it was decoded uncalibrated.
  calibrated = {**current, "downstream.calibration": "train_mean"}
  assert [(d.key, d.stored, d.current) for d in fingerprint.differences(old, calibrated)] == [
    ("downstream.calibration", "none", "train_mean")
  ]


def test_a_record_without_the_random_bits_is_not_compared_on_them():
  """fingerprint.UNRECORDED_BEFORE: records written before the kind of random bits was recorded do not say
  which kind made them, so they are accepted under either; a record that says is held to it."""
  keys = {"seed": 0, fingerprint.RANDOM_BITS: "threefry_partitionable"}
  old = {"seed": 0}
  assert fingerprint.differences(old, keys) == []
  assert fingerprint.differences(old, {**keys, "seed": 1})[0].key == "seed"
  other = {**keys, fingerprint.RANDOM_BITS: "threefry"}
  (diff,) = fingerprint.differences(keys, other)
  assert (diff.key, diff.stored, diff.current) == (
    fingerprint.RANDOM_BITS,
    "threefry_partitionable",
    "threefry",
  )
  assert fingerprint.restore_flags([diff]) == "JAX_THREEFRY_PARTITIONABLE=1"
  # Each stage records it (this process's kind: tests/conftest.py sets the non-partitionable one).
  config = config_lib.base_config("maml", "cls2cls")
  config.model = str(resources.SMALL_T5_DIR)  # a directory: no hub to reach
  assert pipeline.upstream_fingerprint(config, {})[fingerprint.RANDOM_BITS] == "threefry"


def test_stage_keys_leave_out_only_what_cannot_change_results():
  config = config_lib.base_config("maml", "cls2cls")
  upstream, downstream = (fingerprint.stage_keys(config, s) for s in ("upstream", "downstream"))
  assert "upstream.lr" in upstream and "downstream.lrs" not in upstream
  assert "downstream.lrs" in downstream and "upstream.lr" not in downstream  # via the prompt's hash
  for key in ("method", "model", "seed", "seeds", "prompt.length", "dtype", "dropout_rate"):
    assert key in upstream and key in downstream
  for key in fingerprint.HARMLESS:
    assert key not in upstream and key not in downstream
  # Under after_padding, the evaluation batch sets where the prompt sits: then it changes results.
  config.prompt.placement = "after_padding"
  assert "downstream.eval_batch_size" in fingerprint.stage_keys(config, "downstream")


def _exploding_above_lr_1(name, learning_rate, **kwargs):
  """Adafactor whose 3rd update overflows when its learning rate is above 1: a run that trains for a while
  and then diverges, deterministically, and does not at a lower rate."""
  import jax.numpy as jnp
  import optax

  def factory(learning_rate):
    blow_up = optax.scale_by_schedule(
      lambda count: jnp.where((count == 2) & (learning_rate > 1), jnp.inf, 1.0)
    )
    return optax.chain(optim.hf_adafactor(learning_rate), blow_up)

  return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(learning_rate=learning_rate)


def test_a_lower_learning_rate_recovers_a_diverged_upstream(tmp_path, checkpoint, monkeypatch, caplog):
  monkeypatch.setattr(optim, "make_optimizer", _exploding_above_lr_1)
  workdir = tmp_path / "run"
  config = tiny_config(checkpoint, **{"upstream.lr": 2.0, "upstream.log_every": 1, "stages": ("upstream",)})
  message = error_of(lambda: pipeline.run(config, str(workdir)), FloatingPointError)
  # The step the guard caught, counted as metrics.jsonl counts them, and what was not finite.
  assert message.startswith("upstream diverged at step 3: the update overflowed (the loss, ")
  logged = [r["step"] for r in map(json.loads, open(workdir / "upstream/logs/metrics.jsonl"))]
  assert logged == [1, 2]
  assert "continues from step 2, the last good checkpoint" in message
  assert sorted(os.listdir(workdir / "upstream/checkpoints")) == ["2"]

  # The same rate again: refused before any compute, instead of diverging again (the stuck workdir).
  assert_catalogued(
    "same-lr-after-divergence",
    error_of(lambda: pipeline.run(config, str(workdir)), fingerprint.WorkdirConflict),
  )
  # A lower rate: continues from step 2 with it (the checkpointed optimizer state's rate is replaced).
  config.upstream.lr = 0.5
  with caplog.at_level("INFO"):
    pipeline.run(config, str(workdir))
  assert_catalogued("lower-lr-after-divergence", caplog.text)
  logged = list(map(json.loads, open(workdir / "upstream/logs/metrics.jsonl")))
  assert [(r["step"], r["upstream/learning_rate"]) for r in logged] == [
    (1, 2.0),
    (2, 2.0),
    (3, 0.5),
    (4, 0.5),
  ]
  meta = json.loads((workdir / "upstream/prompt.json").read_text())
  assert [(r["step"], r["upstream.lr"]) for r in meta["learning_rates"]] == [(0, 2.0), (2, 0.5)]
  assert meta["steps"] == 4 and np.isfinite(np.load(workdir / "upstream/prompt.npy")).all()
  record = fingerprint.Record.load(str(workdir / "upstream"))
  assert not record.diverged and record.divergences[0]["step"] == 3 and record.keys["upstream.lr"] == 0.5


def test_a_diverging_downstream_run_is_marked_failed_and_the_others_go_on(tmp_path, checkpoint):
  config = tiny_config(checkpoint, "pt", **{"downstream.lrs": (1e30, 0.5)})
  summary = pipeline.run(config, str(tmp_path / "pt"))
  task = summary["tasks"]["synth-sentiment_d"]
  assert task["failed_runs"] == [
    {"seed": 13, "learning_rate": 1e30, "step": 1},
    {"seed": 100, "learning_rate": 1e30, "step": 1},
  ]
  assert all(run["best_lr"] == 0.5 for run in task["runs"]) and task["n_nan"] == 0
  assert all(np.isfinite(task["test_scores"]))
  meta = json.loads((tmp_path / "pt/downstream/synth-sentiment_d/prompts/seed13_lr1e+30.json").read_text())
  assert meta["failed_at_step"] == 1
  assert_catalogued("downstream-run-diverges", (tmp_path / "pt/results.md").read_text())


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, checkpoint, caplog):
  import jax

  from mpt_jax import algorithms, methods, train

  model, params = helpers_t5.tiny_t5("1.1", dropout_rate=0.0)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  step = algorithms.jit_step(
    methods.make_step("pt", algorithms.make_loss_fn(model, deterministic=True), optimizer)
  )
  prompt0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (3, model.config.d_model)))
  sample = lambda s: helpers_t5.random_batch(s, batch=4, input_length=6, target_length=3)

  def upstream(workdir, num_steps):
    loop = train.LoopConfig(num_steps=num_steps, checkpoint_every=2, log_every=2, seed=0)
    return train.train_prompt(
      step, algorithms.init_state(prompt0, optimizer), params, sample, loop, str(workdir)
    )

  straight = upstream(tmp_path / "straight", 6)
  upstream(tmp_path / "damaged", 4)  # checkpoints 2 and 4
  for part in (tmp_path / "damaged/checkpoints/4/arrays").rglob("*"):
    if part.is_file() and part.stat().st_size:
      part.write_bytes(b"\0" * 7)  # a truncated or overwritten file
  with caplog.at_level("WARNING"):
    resumed = upstream(tmp_path / "damaged", 6)
  assert_catalogued("checkpoint-unreadable", caplog.text)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), resumed, straight)
  assert sorted(os.listdir(tmp_path / "damaged/checkpoints.unreadable")) == ["4"]  # kept aside, not deleted


# --- the catalogue: the rows of ROWS_SHOWN_ELSEWHERE are checked by the tests above ------------------------


def test_the_catalogue_and_its_reproductions_name_the_same_cases():
  assert set(catalogue_rows()) == set(REPRODUCTIONS)


class Context:
  def __init__(self, request, tmp_path, checkpoint):
    self.request, self.tmp, self.checkpoint = request, tmp_path, checkpoint

  @property
  def finished(self) -> Path:  # built once per module, on first use
    return self.request.getfixturevalue("finished_maml")


@pytest.mark.parametrize("case", sorted(set(REPRODUCTIONS) - set(ROWS_SHOWN_ELSEWHERE)))
def test_catalogue(case, request, tmp_path, checkpoint, caplog, monkeypatch):
  ctx = Context(request, tmp_path, checkpoint)
  if case == "harmless-change":
    message = harmless_change(ctx, caplog)
  elif case == "disk-full":
    message = disk_full(ctx, monkeypatch)
  elif case == "lease-lost":
    message = lease_lost(ctx, monkeypatch)
  elif case == "other-model-snapshot":
    message = other_model_snapshot(ctx, monkeypatch)
  else:
    message = REPRODUCTIONS[case](ctx)
  assert_catalogued(case, message)
