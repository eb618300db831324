"""The frozen weights on a 2-D mesh ('data', 'model'): partition rules by name (mpt_jax/sharding.py),
the mesh, the Runtime's placement, and (in a subprocess with 8 simulated devices,
tests/mesh_2d_checks.py) every step on a data 2 x model 4 mesh equal to the single-device step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers_t5
from mpt_jax import config as config_lib, parallel, pipeline, sharding
from mpt_jax.model.t5 import T5, T5Config

REPO = Path(__file__).resolve().parents[1]
M = sharding.MODEL_AXIS


def t5_large_lm_adapt_shapes():
  """The shapes (no weights) of google/t5-large-lm-adapt (T5 v1.1: gated-GELU, untied head)."""
  config = T5Config(
    vocab_size=32128,
    d_model=1024,
    d_kv=64,
    d_ff=2816,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    dtype="bfloat16",
  )
  ids = jax.ShapeDtypeStruct((1, 2), np.int32)
  shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), ids, ids, ids)["params"]
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.compute_dtype), shapes)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_every_weight_of_a_t5_has_a_rule_that_splits_the_big_ones(version):
  _, params = helpers_t5.tiny_t5(version)
  specs = {
    sharding.param_path(path): spec
    for path, spec in jax.tree_util.tree_flatten_with_path(
      sharding.frozen_specs(params, 2), is_leaf=lambda x: isinstance(x, P)
    )[0]
  }
  assert specs["encoder/block_0/layer_0/SelfAttention/q/kernel"] == P(None, M)
  assert specs["decoder/block_1/layer_1/EncDecAttention/o/kernel"] == P(M, None)
  assert specs["shared/embedding"] == P(M, None)
  assert specs["encoder/final_layer_norm/weight"] == P()
  assert specs["encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding"] == P()
  ff = "encoder/block_0/layer_1/DenseReluDense"
  if version == "1.1":  # gated-GELU, untied head
    assert specs[f"{ff}/wi_0/kernel"] == specs[f"{ff}/wi_1/kernel"] == P(None, M)
    assert specs["lm_head/kernel"] == P(None, M)
  else:
    assert specs[f"{ff}/wi/kernel"] == P(None, M) and "lm_head/kernel" not in specs
  assert specs[f"{ff}/wo/kernel"] == P(M, None)


def test_t5_large_splits_to_an_eighth_of_its_weights_per_device():
  shapes = t5_large_lm_adapt_shapes()
  total = sharding.bytes_per_device(shapes, 1)
  assert total == 783_150_080 * 2  # its parameters, in bfloat16
  # What stays whole on each device (layer norms, position biases) is under a megabyte.
  assert 0 < sharding.bytes_per_device(shapes, 8) - total / 8 < 1e6
  assert "1.57 GB, 0.196 GB per device (split over 8" in sharding.describe(shapes, 8)


def test_a_weight_stacked_over_layers_splits_its_trailing_dimensions():
  """A scanned T5 keeps its blocks' weights with a leading layer axis; the rule names the trailing ones."""
  assert sharding.partition_spec("encoder/blocks/layer_0/SelfAttention/q/kernel", (23, 16, 32), 4) == P(
    None, None, M
  )
  assert sharding.partition_spec("decoder/blocks/layer_2/DenseReluDense/wo/kernel", (23, 64, 16), 4) == P(
    None, M, None
  )


def test_a_dimension_that_does_not_divide_keeps_the_weight_whole_and_says_so():
  assert sharding.partition_spec("encoder/block_0/layer_0/SelfAttention/q/kernel", (16, 12), 8) == P()
  _, params = helpers_t5.tiny_t5("1.1", num_heads=3)  # heads x d_kv = 24: not over 16 devices
  text = sharding.describe(params, 16)
  assert "whole on every device: " in text and "SelfAttention/q/kernel" in text


def test_a_weight_without_a_rule_is_an_error_naming_it():
  with pytest.raises(ValueError, match="parameter encoder/adapter/kernel: no partition rule names it"):
    sharding.frozen_specs({"encoder": {"adapter": {"kernel": np.zeros((4, 4))}}}, 2)


def test_the_mesh_is_data_by_model():
  mesh = parallel.make_mesh(model_parallel=2)
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 1, "model": 2}
  assert dict(parallel.make_mesh().shape) == {"data": 2, "model": 1}
  assert "as data 1 x model 2" in parallel.describe(mesh)
  with pytest.raises(ValueError, match="model_parallel=3: the 2 device"):
    parallel.make_mesh(model_parallel=3)


def test_the_runtime_splits_the_frozen_weights_over_the_model_axis(tmp_path):
  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.model_parallel, config.upstream.tasks_per_step = 2, 1
  runtime = pipeline.build_runtime(config, str(tmp_path / "run"), upstream=True)
  assert dict(runtime.mesh.shape) == {"data": 1, "model": 2}
  kernel = runtime.frozen_params["decoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
  assert kernel.shape == (16, 16) and {s.data.shape for s in kernel.addressable_shards} == {(16, 8)}
  assert runtime.frozen_params["encoder"]["final_layer_norm"]["weight"].sharding.is_fully_replicated
  assert runtime.upstream_step._cache_size() == 0  # built, not compiled


def test_the_config_checks_the_model_axis_against_the_devices():
  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.gym, config.model, config.model_parallel = "synthetic", str(REPO / "assets" / "small_t5"), 2
  with pytest.raises(config_lib.ConfigError, match="tasks_per_step=2 does not split"):
    config_lib.validate(config, available_devices=8)  # data axis 4
  config_lib.validate(config, available_devices=4)  # data 2 x model 2
  config.num_devices = 3
  with pytest.raises(config_lib.ConfigError, match="do not split into groups of 2"):
    config_lib.validate(config, available_devices=4)


@pytest.mark.slow
def test_steps_on_a_data_2_by_model_4_mesh_of_8_devices_equal_one_device():
  """tests/mesh_2d_checks.py in a process with 8 simulated CPU devices (this one has 2)."""
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  done = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/mesh_2d_checks.py"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
  summary = done.stdout.strip().splitlines()[-1]
  assert re.match(r"8 passed in ", summary), done.stdout[-2000:]  # none skipped for want of devices


def test_the_memory_table_of_docs_memory_md_is_what_its_script_prints():
  """docs/MEMORY.md quotes `python -m benchmarks.memory_table`; its weights are the exact shapes'."""
  from benchmarks import memory_table

  text = memory_table.table()
  assert "| T5-large | 0.78 B | 1.5 GiB |" in text and "| T5-XXL | 11.14 B | 20.7 GiB |" in text
  assert 0.5 < memory_table.calibration() < 3  # the analytic count is within a small factor of XLA's
  assert text in (REPO / "docs" / "MEMORY.md").read_text()
