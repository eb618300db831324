"""The wheel carries what an installed user needs: built from this tree, installed into a fresh venv outside
the repository (no network: the dependencies come from this venv's site-packages through a .pth line, the
wheel with --no-deps --no-index), `mpt-jax demo` runs at smoke size from another directory on the package's
own configs, small T5 and WordNet gym, and the package it imports is the installed one, not the checkout."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The demo preset (launch.sh demo) cut to one method, one seed, one task, one learning rate, two steps.
SMOKE = [
  "--methods=pt",
  "--set=seeds=(100,)",
  "--set=downstream.tasks=('wn-antonym_pair',)",
  "--set=downstream.lrs=(0.5,)",
  "--set=downstream.num_steps=2",
  "--set=downstream.eval_every=2",
]


def _run(cmd, **kwargs):
  done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  assert done.returncode == 0, (
    f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
  )
  return done


def _build_wheel(tmp_path: Path) -> Path:
  # A copy of what the wheel is built from, so that setuptools' build/ and egg-info land in tmp_path.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy2(REPO / name, src / name)
  shutil.copytree(REPO / "mpt_jax", src / "mpt_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  dist = tmp_path / "dist"
  _run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    + ["-w", str(dist), str(src)]
  )
  (wheel,) = dist.glob("mpt_jax-*.whl")
  return wheel


def _fresh_venv(tmp_path: Path) -> Path:
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  python = venv / "bin" / "python"
  purelib = _run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
  ).stdout.strip()
  # This venv's packages as plain path entries: their own .pth files (the checkout's editable finder among
  # them) are not run, so the checkout cannot come in through them.
  ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if os.path.isdir(p)]
  (Path(purelib) / "test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
  return venv


def test_the_installed_wheel_runs_the_demo_from_its_own_resources(tmp_path):
  wheel = _build_wheel(tmp_path)
  venv = _fresh_venv(tmp_path)
  python = venv / "bin" / "python"
  _run(
    [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)]
  )

  elsewhere = tmp_path / "elsewhere"  # no configs/ or assets/ here, and not the checkout
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "MPT_DEMO_WORKDIR")}
  where = _run(
    [
      str(python),
      "-c",
      "import json, mpt_jax, mpt_jax.main as m, mpt_jax.resources as r, mpt_jax.config as c;"
      "argv = m.with_shipped_configs(['mpt-jax', '--config=configs/maml_cls2cls.py:demo']);"
      "print(json.dumps({'package': mpt_jax.__file__, 'config': argv[1], 'mistakes': m.config_mistakes(argv),"
      "'model': c.base_config('pt', 'wn_cls2cls', 'demo').model, 'configs': len(r.shipped_configs())}))",
    ],
    cwd=elsewhere,
    env=env,
  )
  found = json.loads(where.stdout.strip().splitlines()[-1])
  installed = str(venv)
  assert found["package"].startswith(installed), found  # the wheel's package, not the checkout's
  assert found["config"].startswith(f"--config={installed}") and found["config"].endswith(":demo"), found
  assert found["mistakes"] == [] and found["configs"] == 55, found
  assert found["model"].startswith(installed) and os.path.isfile(os.path.join(found["model"], "config.json"))

  done = _run([str(venv / "bin" / "mpt-jax"), "demo", "--workdir=out", *SMOKE], cwd=elsewhere, env=env)
  table = elsewhere / "out" / "comparison_wn_cls2cls.md"
  assert table.is_file(), done.stderr[-3000:]
  assert "wn-antonym_pair" in table.read_text() and "| PT |" in table.read_text()
  record = json.loads((elsewhere / "out" / "pt" / "run_record.json").read_text())[-1]
  assert record["config"]["model"].startswith(installed) and record["executable"].startswith(installed)
  assert f"data {installed}" in done.stderr  # the WordNet gym read from the installed package
