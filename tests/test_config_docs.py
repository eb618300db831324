"""`mpt-jax config`: every config key with its value and its meaning, read from the comments beside the
keys in config.base_config; a key without a comment fails here."""

from __future__ import annotations

import pytest

from mpt_jax import cli, config as config_lib, config_docs, methods


@pytest.mark.parametrize("method", methods.names())
def test_every_key_of_every_method_has_a_meaning(method):
  meanings = config_docs.key_meanings()
  keys = config_lib.flatten(config_lib.base_config(method, "cls2cls"))
  assert [k for k in keys if not meanings.get(k)] == []


def test_meanings_come_from_the_trailing_comment_or_the_block_above():
  source = """def _prompt_keys():
  s = ml_collections.ConfigDict()
  s.alpha = 1  # the first
  # The second, over
  # two lines.
  s.beta = 2
  s.gamma = 3
  s.sub = ml_collections.ConfigDict()
  s.eps = "#"  # a '#' in the value is not the comment
  return s
"""
  assert config_docs.assigned_meanings(source, "s", "prompt.") == {
    "prompt.alpha": "the first",
    "prompt.beta": "The second, over two lines.",
    "prompt.eps": "a '#' in the value is not the comment",
  }  # gamma has none: the check above would name it
  assert config_docs.first_sentence("Min et al. 2022 say so. Then more.") == "Min et al. 2022 say so."


def test_the_config_command_prints_every_key_with_its_value(capsys):
  assert cli.main(["config", "maml_cls2cls:tiny"]) == 0
  lines = capsys.readouterr().out.splitlines()[1:]
  config = config_lib.base_config("maml", "cls2cls", "tiny")
  printed = {line.split(" = ", 1)[0]: line for line in lines}
  assert list(printed) == list(config_lib.flatten(config))
  assert printed["downstream.lrs"].startswith("downstream.lrs = (0.5, 0.3)")
  assert "# the grid's learning rates" in printed["downstream.lrs"]
  assert cli.main(["config", "no_such_config"]) == 1
  assert "no config file 'no_such_config'" in capsys.readouterr().err
