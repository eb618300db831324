"""A method is one entry of mpt_jax/methods.py: a toy method registered here, in this file alone, runs
through the config, its checks, the upstream sampler, `pipeline.run` and the result tables.

The toy ("episodic multi-task") trains upstream on episodes without adapting: its gradient is that of
(1 - w) x the support loss + w x the query loss at the current prompt, w its own hyperparameter
`upstream.query_weight` (a key that only it adds to the config)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from mpt_jax import config as config_lib, methods, optim, pipeline
from mpt_jax.algorithms import common

TOY = "episodic_mtl"


def flat_rows(tree, leading: int):
  """The tree's arrays with their first `leading` axes merged: one batch of rows for the loss."""
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[leading:]), tree)


def make_toy_grad_fn(loss_fn, *, query_weight: float):
  def objective(prompt, frozen_params, episode, rng):
    support_rng, query_rng = jax.random.split(rng)
    support = loss_fn(prompt, frozen_params, flat_rows(episode["support"], 3), support_rng)
    query = loss_fn(prompt, frozen_params, flat_rows(episode["query"], 2), query_rng)
    return (1 - query_weight) * support + query_weight * query, (support, query)

  def grad_fn(prompt, frozen_params, episode, rng, shard_index):
    rng = common.example_rng(rng, shard_index)
    (loss, (support, query)), grad = jax.value_and_grad(objective, has_aux=True)(
      prompt, frozen_params, episode, rng
    )
    return grad, {"loss": loss, "support_loss": support, "query_loss": query}

  return grad_fn


TOY_METHOD = methods.Method(
  TOY,
  "Episodic MTL",
  make_toy_grad_fn,
  upstream=methods.EPISODES,
  needs_query=True,
  options={"query_weight": "query_weight"},
  defaults=dict(
    num_steps=5000, tasks_per_step=2, inner_steps=1, inner_batch_size=2, query_size=2, query_weight=0.25
  ),
)


@pytest.fixture
def toy_method():
  methods.register(TOY_METHOD)
  try:
    yield TOY_METHOD
  finally:
    methods.unregister(TOY)


def test_the_registry_holds_the_study_and_refuses_bad_entries():
  assert methods.names()[:5] == ("pt", "mtl", "maml", "fomaml", "reptile")
  assert [methods.get(m).has_upstream for m in methods.names()[:5]] == [False, True, True, True, True]
  assert [methods.get(m).needs_query for m in ("maml", "fomaml", "reptile")] == [True, True, False]
  with pytest.raises(ValueError, match="registered already"):
    methods.register(methods.get("maml"))
  with pytest.raises(ValueError, match="not keywords of its grad_fn"):
    methods.Method("bad", "Bad", make_toy_grad_fn, upstream=methods.EPISODES, options={"lr": "inner_lr"})
  with pytest.raises(ValueError, match="needs_query"):
    methods.Method("bad", "Bad", make_toy_grad_fn, upstream=methods.POOL, needs_query=True)
  with pytest.raises(ValueError, match="unknown method 'imaml'"):
    config_lib.base_config("imaml", "synth_mini")


def test_a_toy_methods_step_is_its_gradient(toy_method):
  """make_step builds the registered step: one SGD step moves the prompt by -lr x the toy's gradient,
  computed here by hand from the two losses."""

  def loss_fn(prompt, frozen_params, batch, rng):  # a quadratic stand-in for the model
    return jnp.mean((batch["x"] @ prompt.T - frozen_params) ** 2)

  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  episode = {
    "support": {"x": jnp.asarray(rng.normal(size=(2, 1, 2, 3)), jnp.float32)},
    "query": {"x": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)},
  }
  sgd = optim.make_optimizer("sgd", 0.1)
  step = methods.make_step(TOY, loss_fn, sgd, query_weight=0.25)
  new, metrics = jax.jit(step)(common.init_state(prompt, sgd), 0.5, episode, jax.random.key(0))
  support_grad = jax.grad(loss_fn)(prompt, 0.5, {"x": episode["support"]["x"].reshape(4, 3)}, None)
  query_grad = jax.grad(loss_fn)(prompt, 0.5, {"x": episode["query"]["x"].reshape(4, 3)}, None)
  expected = prompt - 0.1 * (0.75 * support_grad + 0.25 * query_grad)
  np.testing.assert_allclose(new.prompt, expected, rtol=1e-5, atol=1e-6)
  assert set(metrics) >= {"loss", "support_loss", "query_loss"}
  with pytest.raises(ValueError, match=r"needs query_weight \(config.upstream.query_weight\)"):
    methods.make_step(TOY, loss_fn, sgd)


def test_a_toy_method_runs_through_the_pipeline(toy_method, tmp_path):
  checkpoint = helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5")
  config = config_lib.base_config(TOY, "synth_mini", "tiny")
  assert config.upstream.query_weight == 0.25 and config.upstream.num_steps == 4  # its defaults, the preset
  config.gym, config.model, config.dropout_rate = "synthetic", str(checkpoint), 0.0
  config.upstream.num_steps = 3
  config.upstream.query_size = 0  # the toy needs a query set: refused like MAML's
  with pytest.raises(config_lib.ConfigError, match="upstream.query_size"):
    config_lib.validate(config)
  config.upstream.query_size = 2

  workdir = tmp_path / "run"
  summary = pipeline.run(config, str(workdir))
  assert summary["method"] == TOY and list(summary["tasks"]) == ["synth-sentiment_d"]
  assert np.load(workdir / "upstream" / "prompt.npy").shape == (config.prompt.length, 16)
  logged = [json.loads(line) for line in (workdir / "upstream/logs/metrics.jsonl").read_text().splitlines()]
  steps = [r for r in logged if "upstream/query_loss" in r]  # the toy's own metrics reach the log
  assert [r["step"] for r in steps] == [1, 2, 3]
  for r in steps:  # its loss is its weighted sum of the two
    expected = 0.75 * r["upstream/support_loss"] + 0.25 * r["upstream/query_loss"]
    assert r["upstream/loss"] == pytest.approx(expected, rel=1e-5)
  fingerprint = json.loads((workdir / "upstream" / "fingerprint.json").read_text())
  assert "upstream.query_weight" in json.dumps(fingerprint)  # its own key is part of its results' identity
  assert re.search(r"Episodic MTL", Path(workdir / "results.md").read_text())
