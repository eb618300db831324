"""One job per workdir (mpt_jax/lease.py): a second job refuses at once in one line naming the holder; a
stale lease (an old heartbeat, a dead process of this host) is taken with a log line; the heartbeat is
refreshed; a URL workdir works the same. End to end: two identical `python -m mpt_jax.main` runs started
at once on one tiny workdir: one refuses in seconds, the other finishes with the results of a run alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers_lease
import helpers_t5
from mpt_jax import checkpoints, lease, parallel, paths, results

REPO = Path(__file__).resolve().parents[1]


def holder(workdir: Path, **fields) -> None:
  """Another job's lease in `workdir` (a live one on another host unless `fields` say otherwise)."""
  workdir.mkdir(parents=True, exist_ok=True)
  record = {"host": "tpu-w-0", "pid": 4242, "start": "2026-12-06T12:00:00Z", "heartbeat_s": time.time()}
  (workdir / lease.FILE).write_text(json.dumps(record | fields))


def test_a_held_workdir_is_refused_in_one_line_naming_the_holder(tmp_path):
  holder(tmp_path / "w")
  with pytest.raises(lease.WorkdirBusy) as busy:
    lease.take(str(tmp_path / "w"))
  message = str(busy.value)
  assert "\n" not in message and "host tpu-w-0 pid 4242, started 2026-12-06T12:00:00Z" in message
  assert "MPT_LEASE_FORCE=1" in message and "MPT_LEASE_STALE_S" in message
  assert json.loads((tmp_path / "w" / lease.FILE).read_text())["host"] == "tpu-w-0"  # left as it was


def test_take_refresh_and_release(tmp_path, monkeypatch):
  monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.05")
  workdir = str(tmp_path / "new" / "w")
  held = lease.take(workdir)  # makes the workdir
  first = json.loads((tmp_path / "new" / "w" / lease.FILE).read_text())
  assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
  deadline = time.monotonic() + 60  # a loaded machine may delay the first beats
  while lease.read(workdir)["heartbeat_s"] <= first["heartbeat_s"]:  # mid-rewrite: reads as 0
    assert time.monotonic() < deadline, "the heartbeat never refreshed the lease"
    time.sleep(0.05)
  lease.release(workdir)
  assert not Path(held.path).exists()
  lease.release(workdir)  # nothing held: nothing to do


@pytest.mark.parametrize(
  "fields, reason",
  [
    ({"heartbeat_s": time.time() - 3600}, "heartbeat is"),
    ({"host": socket.gethostname(), "pid": 2**22 + 12345}, "on this host is gone"),
  ],
)
def test_a_stale_lease_is_taken_with_a_log_line(tmp_path, caplog, fields, reason):
  holder(tmp_path, **fields)
  with caplog.at_level("WARNING"):
    lease.take(str(tmp_path))
  try:
    assert any("taking over the lease" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / lease.FILE).read_text())["pid"] == os.getpid()
  finally:
    lease.release(str(tmp_path))


def test_force_takes_a_live_lease(tmp_path, monkeypatch):
  monkeypatch.setenv("MPT_LEASE_FORCE", "1")
  monkeypatch.setenv("MPT_LEASE_SETTLE_S", "0")
  holder(tmp_path)
  lease.take(str(tmp_path))
  lease.release(str(tmp_path))


def test_a_url_workdir_holds_a_lease_too(monkeypatch):
  monkeypatch.setenv("MPT_LEASE_SETTLE_S", "0")
  workdir = f"memory://lease-test-{os.getpid()}/w"
  lease.take(workdir)
  record = json.loads(paths.read_text(paths.join(workdir, lease.FILE)))
  paths.write_text(paths.join(workdir, lease.FILE), json.dumps(record | {"host": "elsewhere", "token": "x"}))
  lease.release(workdir)  # not ours any more: left in place
  with pytest.raises(lease.WorkdirBusy, match="host elsewhere"):
    lease.take(workdir)
  paths.remove(paths.join(workdir, lease.FILE))


# --- a lease lost while the job runs ------------------------------------------------------------------------


def test_a_lost_lease_stops_the_next_checkpoint_and_results_write(tmp_path, monkeypatch):
  monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.02")
  workdir = tmp_path / "w"
  held = lease.take(str(workdir))
  try:
    ckpt = checkpoints.Checkpointer(workdir / "upstream" / "checkpoints")
    assert ckpt.save(1, {"prompt": np.ones(3)})  # held: saved
    ckpt.close()
    ckpt = checkpoints.Checkpointer(workdir / "upstream" / "checkpoints")
    helpers_lease.lose(held)
    with pytest.raises(lease.LeaseLost) as lost:
      ckpt.save(2, {"prompt": np.ones(3)})
    message = str(lost.value)
    assert "\n" not in message and "host tpu-w-9 pid 777" in message and str(workdir) in message
    assert "upstream/checkpoints" in message and "rerun this command" in message
    ckpt.close()
    assert sorted(os.listdir(workdir / "upstream" / "checkpoints")) == ["1"]  # step 2 not written
    summary = results.summarize_task("t", [{"task": "t", "seed": 1, "test_score": 0.5}])
    with pytest.raises(lease.LeaseLost, match="results.json"):
      results.write_task_results(summary, workdir / "downstream" / "t")
    assert not (workdir / "downstream" / "t" / "results.json").exists()
    with pytest.raises(lease.LeaseLost):
      results.run_record({}, workdir)
    assert not (workdir / "run_record.json").exists()
    # Outside the workdir (another run's results, a comparison elsewhere): not this lease's business.
    assert Path(results.write_task_results(summary, tmp_path / "elsewhere")).exists()
  finally:
    lease.release(str(workdir))
  assert json.loads((workdir / lease.FILE).read_text())["token"] == "other"  # the other job's, kept
  lease.check(str(workdir / "x"))  # released: nothing held, nothing to refuse


def test_a_removed_lease_is_lost_too_and_a_storage_hiccup_is_not(tmp_path, monkeypatch):
  monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.02")
  workdir = tmp_path / "w"
  held = lease.take(str(workdir))
  try:
    failed = []

    def unreadable(path):  # a transient storage error while the heartbeat reads the lease
      failed.append(path)
      raise OSError("503 Service Unavailable")

    monkeypatch.setattr(lease.paths, "read_text", unreadable)
    deadline = time.monotonic() + 60
    while len(failed) < 3 and time.monotonic() < deadline:
      time.sleep(0.02)
    monkeypatch.undo()
    assert len(failed) >= 3 and not held.lost  # three failed beats, still held
    monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.02")
    helpers_lease.until_lost(held, lambda: Path(held.path).unlink(missing_ok=True))
    with pytest.raises(lease.LeaseLost, match="lease.json was removed"):
      lease.check(str(workdir / "results.json"))
  finally:
    lease.release(str(workdir))


def test_a_held_lease_lets_writes_through(tmp_path, monkeypatch):
  monkeypatch.setenv("MPT_LEASE_HEARTBEAT_S", "0.02")
  workdir = tmp_path / "w"
  held = lease.take(str(workdir))
  try:
    time.sleep(0.2)  # several heartbeats, each finding its own token
    assert not held.lost
    lease.check(str(workdir / "results.json"))
  finally:
    lease.release(str(workdir))


# A run whose lease is lost mid-way, as main reports it (the run itself stood in for: the loss is above).
_LOST_RUN = """
import sys
from absl import app
from mpt_jax import lease, main, pipeline
def run(config, workdir):
  raise lease.LeaseLost(f"lease of workdir {workdir} lost: another job took it over")
pipeline.run = run
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.parametrize(
  "error, code", [("lease.LeaseLost", 75), ("lease.WorkdirBusy", 75), ("fingerprint.WorkdirConflict", 1)]
)
def test_main_exits_75_when_the_workdir_is_another_jobs_and_1_for_a_mistake(tmp_path, error, code):
  script = _LOST_RUN.replace("lease.LeaseLost", error).replace(
    "from mpt_jax import lease,", "from mpt_jax import fingerprint, lease,"
  )
  done = subprocess.run(
    [sys.executable, "-c", script, "--config=configs/maml_cls2cls.py:tiny", f"--workdir={tmp_path}"],
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == code, done.stderr[-3000:]
  (fatal,) = [line for line in done.stderr.splitlines() if line.startswith("FATAL")]
  assert fatal == f"FATAL {error.split('.')[1]}: lease of workdir {tmp_path} lost: another job took it over"
  assert "Traceback" not in done.stderr


# --- every process of a multi-process job hears the primary's refusal ------------------------------------


def test_primary_says_in_one_process_is_the_call_itself(tmp_path):
  calls = []
  parallel.primary_says(lambda: calls.append(1), refusals=(lease.WorkdirBusy,))
  assert calls == [1]
  holder(tmp_path)
  with pytest.raises(lease.WorkdirBusy, match="host tpu-w-0 pid 4242"):
    parallel.primary_says(lambda: lease.take(str(tmp_path)), refusals=(lease.WorkdirBusy,))


def test_primary_says_tells_every_process_what_the_primary_raised(tmp_path, monkeypatch):
  """The multi-process path with the collective stood in for: the primary's verdict, as broadcast, is
  what another process raises (the real collective: tests/test_multiprocess.py)."""
  monkeypatch.setattr(parallel.jax, "process_count", lambda: 2)
  said = []

  def broadcast(tree):  # the primary's tree reaches everyone
    if not said:
      said.append(tree)
    return said[0]

  monkeypatch.setattr(parallel.multihost_utils, "broadcast_one_to_all", broadcast)
  holder(tmp_path)
  take = lambda: lease.take(str(tmp_path))  # noqa: E731
  with pytest.raises(lease.WorkdirBusy) as primary:
    parallel.primary_says(take, refusals=(lease.WorkdirBusy,))
  monkeypatch.setattr(parallel, "is_primary", lambda: False)
  ran = []
  with pytest.raises(lease.WorkdirBusy) as other:
    parallel.primary_says(lambda: ran.append(1), refusals=(lease.WorkdirBusy,))
  assert not ran and str(other.value) == str(primary.value) and "host tpu-w-0" in str(other.value)
  # Another error of the primary: a RuntimeError elsewhere, naming it; success: nothing raised.
  said.clear()
  monkeypatch.setattr(parallel, "is_primary", lambda: True)
  with pytest.raises(OSError):
    parallel.primary_says(lambda: (_ for _ in ()).throw(OSError("disk gone")), refusals=(lease.WorkdirBusy,))
  monkeypatch.setattr(parallel, "is_primary", lambda: False)
  with pytest.raises(RuntimeError, match="process 0.*OSError: disk gone"):
    parallel.primary_says(lambda: None, refusals=(lease.WorkdirBusy,))
  said.clear()
  said.append({"kind": np.int32(0), "message": np.zeros(4096, np.uint8)})
  parallel.primary_says(lambda: None, refusals=(lease.WorkdirBusy,))


# --- two identical jobs at once on one workdir --------------------------------------------------------------


def _job(checkpoint: str, workdir: Path) -> subprocess.Popen:
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
    "JAX_THREEFRY_PARTITIONABLE": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  flags = [
    "--config=configs/maml_cls2cls.py:tiny",
    f"--workdir={workdir}",
    f"--config.model={checkpoint}",
    "--config.gym=synthetic",
    "--config.setting=synth_mini",
    "--config.dropout_rate=0.0",
    "--config.upstream.num_steps=4",
    "--config.upstream.checkpoint_every=2",
    "--config.downstream.num_steps=4",
    "--config.downstream.max_epochs=0",
  ]
  return subprocess.Popen(
    [sys.executable, "-m", "mpt_jax.main", *flags],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def _outputs(workdir: Path) -> dict[str, np.ndarray]:
  """The prompts a run leaves (upstream's and every grid's), by path under the workdir."""
  found = {str(p.relative_to(workdir)): np.load(p) for p in sorted(workdir.rglob("*.npy"))}
  assert found, f"no prompts under {workdir}"
  return found


@pytest.mark.slow
def test_two_jobs_at_once_on_one_workdir_one_refuses_the_other_equals_a_run_alone(tmp_path):
  checkpoint = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  shared = tmp_path / "runs" / "shared"
  started = time.monotonic()
  jobs = [_job(checkpoint, shared), _job(checkpoint, shared)]
  ended: dict[int, float] = {}
  while len(ended) < 2:
    for i, job in enumerate(jobs):
      if i not in ended and job.poll() is not None:
        ended[i] = time.monotonic() - started
    time.sleep(0.2)
    assert time.monotonic() - started < 900, "the two jobs did not end"
  errors = [job.stderr.read() for job in jobs]
  codes = [job.returncode for job in jobs]
  assert sorted(codes) == [0, 75], (codes, [e[-2000:] for e in errors])  # 75: EX_TEMPFAIL, try later
  loser, winner = (0, 1) if codes[0] == 75 else (1, 0)
  fatal = [line for line in errors[loser].splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and fatal[0].startswith("FATAL WorkdirBusy: workdir ") and "pid " in fatal[0]
  assert "Traceback" not in errors[loser]
  assert ended[loser] < ended[winner]  # refused at once, long before the other finished
  assert not (shared / lease.FILE).exists()  # released at the end

  alone = tmp_path / "runs" / "alone"
  job = _job(checkpoint, alone)
  assert job.wait(timeout=900) == 0, job.stderr.read()[-2000:]
  expected, got = _outputs(alone), _outputs(shared)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  results = [json.loads((w / "results.json").read_text()) for w in (shared, alone)]
  for summary in results:  # the fingerprint covers the workdir's own paths (its initial prompt)
    for task in summary["tasks"].values():
      task.pop("config_fingerprint")
  assert results[0] == results[1]
