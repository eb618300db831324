"""Data parallelism on a 1-D device mesh ('data',) with `jax.shard_map`.

- Training steps (PT/MTL/MAML/FoMAML/Reptile): the batch's leading axis (tasks of a meta-batch,
  examples of a PT/MTL batch) is split over devices; the state, frozen params and rng are replicated.
  The per-device step (built with `axis_name=DATA_AXIS`) averages its gradient across devices exactly
  once (mpt_jax/algorithms/common.py explains the check_vma trap it avoids), so every device applies the
  same update and the state stays replicated.
- Downstream grid: R independent runs (each its own prompt, optimizer state and learning rate) split
  over devices along the run axis; no cross-device reduction at all.

On a multi-host TPU pod call `jax.distributed.initialize()` first; the mesh then spans all hosts'
devices and each host feeds its part of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mpt_jax import algorithms
from mpt_jax.algorithms import common

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None, num_devices: int = 0) -> Mesh:
  """A 1-D mesh named ('data',) over `devices` (default: all), or their first `num_devices` (0: all).
  Auto axis: jit may reshard inputs."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices}: only {len(devices)} device(s) here")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def describe(mesh: Mesh) -> str:
  """'2 x cpu (ids 0, 1)': the devices a run uses, for its log."""
  devices = list(mesh.devices.flat)
  kinds = sorted({d.device_kind for d in devices})
  return f"{len(devices)} x {'/'.join(kinds)} (ids {', '.join(str(d.id) for d in devices)})"


def padded_runs(num_runs: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's devices that holds `num_runs` runs."""
  n = mesh.shape[DATA_AXIS]
  return -(-num_runs // n) * n


def _pad_leading(tree, size: int, xp=np):
  """Every array of `tree` with its leading axis padded to `size` by repeating its last entry."""

  def pad(x):
    extra = size - x.shape[0]
    return x if extra == 0 else xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])

  return jax.tree.map(pad, tree)


def shard_runs(tree, mesh: Mesh):
  """Host arrays with a leading run axis, padded to a multiple of the devices (repeating the last run)
  and split over them; take the first R rows of what comes back."""
  num_runs = common.leading_size(tree, "runs")
  return shard(_pad_leading(tree, padded_runs(num_runs, mesh)), mesh, "runs")


def replicate(tree, mesh: Mesh):
  """Put a full copy of `tree` on every device of the mesh (state, frozen params)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(tree, mesh: Mesh, what: str = "batch"):
  """Split every array of `tree` along its leading axis over the mesh's devices."""
  _check_divisible(tree, mesh, what)
  return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


def _check_divisible(tree, mesh: Mesh, what: str) -> None:
  num_devices = mesh.shape[DATA_AXIS]
  size = common.leading_size(tree, what)
  if size % num_devices:
    raise ValueError(
      f"{what}: leading dimension {size} does not split over {num_devices} devices; make "
      f"it a multiple of {num_devices} (tasks per meta-batch, batch size or runs)."
    )


def shard_step(per_device_step: common.StepFn, mesh: Mesh) -> common.StepFn:
  """Jitted data-parallel step from a per-device step built with `axis_name=DATA_AXIS`.

  `step(state, frozen_params, batch, rng)`: batch split along its leading axis; everything else and the
  returned state and metrics replicated. The state is donated.
  """
  sharded = jax.shard_map(
    per_device_step, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P()), out_specs=(P(), P())
  )

  def step(state, frozen_params, batch, rng):
    _check_divisible(batch, mesh, "batch")  # at trace time: shapes are static
    return sharded(state, frozen_params, batch, rng)

  return jax.jit(step, donate_argnums=(0,))


def make_sharded_step(method: str, loss_fn, optimizer, mesh: Mesh, **kwargs) -> common.StepFn:
  """The jitted data-parallel step of `method` (kwargs as for `mpt_jax.algorithms.make_step`)."""
  return shard_step(algorithms.make_step(method, loss_fn, optimizer, axis_name=DATA_AXIS, **kwargs), mesh)


def shard_grid_step(step: common.StepFn, mesh: Mesh) -> common.StepFn:
  """Jitted grid step: R runs of the (unsharded, axis_name=None) `step`, split over devices by run.

  `grid_step(states [R], frozen_params, batches [R, ...], rngs [R])`. Each device vmaps its share of the
  runs; runs are independent, so nothing is reduced across devices. When R does not divide over the
  devices, the runs are padded (the last one repeated) inside the step and the padding dropped from
  what it returns, so no device idles and the results are those of the R runs.
  """
  grid = common.make_grid_step(step)
  sharded = jax.shard_map(
    grid,
    mesh=mesh,
    in_specs=(P(DATA_AXIS), P(), P(DATA_AXIS), P(DATA_AXIS)),
    out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
  )

  def grid_step(states, frozen_params, batches, rngs):
    num_runs = common.leading_size((states, batches, rngs), "grid runs (leading axis R)")
    padded = _pad_leading((states, batches, rngs), padded_runs(num_runs, mesh), jnp)
    out = sharded(padded[0], frozen_params, padded[1], padded[2])
    return jax.tree.map(lambda x: x[:num_runs], out)

  return jax.jit(grid_step, donate_argnums=(0,))
