"""The shipped resources are found through the package (mpt_jax/resources.py), `--config` takes a path or a
shipped config's name, and the `mpt-jax` command dispatches to launch.sh's entry points."""

import os
import subprocess
import sys

import pytest

from mpt_jax import cli, config as config_lib, fingerprint, main as main_lib, resources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_shipped_resources_are_in_the_package_and_the_checkout_links_to_them():
  assert (resources.SMALL_T5_DIR / "model.safetensors").is_file()
  assert (resources.WORDNET_GYM_DIR / "wordnet_task_metrics.json").is_file()
  assert "maml_cls2cls" in resources.shipped_configs() and len(resources.shipped_configs()) == 55
  assert config_lib.base_config("pt", "wn_cls2cls", "demo").model == str(resources.SMALL_T5_DIR)
  for name in ("configs", "assets"):  # the documented checkout paths read the same files
    assert os.path.samefile(os.path.join(REPO, name), resources.PACKAGE_DIR / name)


@pytest.mark.parametrize(
  "arg",
  [
    "maml_cls2cls",
    "maml_cls2cls.py",
    "configs/maml_cls2cls.py",
    "maml_cls2cls:tiny",
    "configs/maml_cls2cls.py:tiny",
  ],
)
def test_a_shipped_config_is_found_by_name_from_any_directory(arg, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  preset = arg.partition(":")[2]
  assert resources.resolve_config(arg) == str(resources.CONFIGS_DIR / "maml_cls2cls.py") + (
    f":{preset}" if preset else ""
  )
  argv = main_lib.with_shipped_configs(["main", f"--config={arg}", "--config.seed=1"])
  assert main_lib.config_mistakes(argv) == []


def test_a_config_path_that_exists_or_names_another_directory_is_left_as_it_is(tmp_path, monkeypatch):
  own = tmp_path / "configs" / "maml_cls2cls.py"  # the user's own file of a shipped config's name
  own.parent.mkdir()
  own.write_text("")
  monkeypatch.chdir(tmp_path)
  assert resources.resolve_config("configs/maml_cls2cls.py:tiny") == "configs/maml_cls2cls.py:tiny"
  for arg in ("elsewhere/maml_cls2cls.py", "/abs/configs/maml_cls2cls.py", "configs/nothere.py"):
    assert resources.resolve_config(arg) == arg
  (mistake,) = main_lib.config_mistakes(["main", "--config=configs/nothere.py"])
  assert "no config file 'configs/nothere.py'" in mistake and str(resources.CONFIGS_DIR) in mistake


def test_a_record_made_with_the_small_t5_before_it_moved_into_the_package_still_matches():
  now = {"model": str(resources.SMALL_T5_DIR), "seed": 0}
  assert fingerprint.differences({**now, "model": fingerprint.MOVED_SMALL_T5}, now) == []
  assert [d.key for d in fingerprint.differences({**now, "model": "/other/small_t5"}, now)] == ["model"]


def test_the_command_says_how_to_use_it(capsys):
  assert cli.main([]) == 2 and "mpt-jax demo" in capsys.readouterr().err
  assert cli.main(["--help"]) == 0 and "mpt-jax analysis" in capsys.readouterr().out
  assert cli.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
  assert cli.main(["configs"]) == 0 and "maml_cls2cls\n" in capsys.readouterr().out


def test_run_refuses_a_missing_config_before_any_compute(tmp_path):
  # In a process of its own: absl's flags (and the required ones) are process-wide.
  cmd = [
    sys.executable,
    "-m",
    "mpt_jax.cli",
    "run",
    "--config=configs/nothere.py",
    f"--workdir={tmp_path / 'w'}",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
  assert done.returncode == 1 and "no config file" in done.stderr, done.stderr
  assert not (tmp_path / "w").exists()
