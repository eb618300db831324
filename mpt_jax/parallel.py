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
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mpt_jax import algorithms
from mpt_jax.algorithms import common

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ('data',) over `devices` (default: all). Auto axis: jit may reshard inputs."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


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
    raise ValueError(f"{what}: leading dimension {size} does not split over {num_devices} devices; make "
                     f"it a multiple of {num_devices} (tasks per meta-batch, batch size or runs).")


def shard_step(per_device_step: common.StepFn, mesh: Mesh) -> common.StepFn:
  """Jitted data-parallel step from a per-device step built with `axis_name=DATA_AXIS`.

  `step(state, frozen_params, batch, rng)`: batch split along its leading axis; everything else and the
  returned state and metrics replicated. The state is donated.
  """
  sharded = jax.shard_map(per_device_step, mesh=mesh,
                          in_specs=(P(), P(), P(DATA_AXIS), P()), out_specs=(P(), P()))

  def step(state, frozen_params, batch, rng):
    _check_divisible(batch, mesh, "batch")  # at trace time: shapes are static
    return sharded(state, frozen_params, batch, rng)

  return jax.jit(step, donate_argnums=(0,))


def make_sharded_step(method: str, loss_fn, optimizer, mesh: Mesh, **kwargs) -> common.StepFn:
  """The jitted data-parallel step of `method` (kwargs as for `mpt_jax.algorithms.make_step`)."""
  return shard_step(algorithms.make_step(method, loss_fn, optimizer, axis_name=DATA_AXIS, **kwargs),
                    mesh)


def shard_grid_step(step: common.StepFn, mesh: Mesh) -> common.StepFn:
  """Jitted grid step: R runs of the (unsharded, axis_name=None) `step`, split over devices by run.

  `grid_step(states [R], frozen_params, batches [R, ...], rngs [R])`; R must divide over the devices.
  Each device vmaps its R / n runs; runs are independent, so nothing is reduced across devices.
  """
  grid = common.make_grid_step(step)
  sharded = jax.shard_map(grid, mesh=mesh, in_specs=(P(DATA_AXIS), P(), P(DATA_AXIS), P(DATA_AXIS)),
                          out_specs=(P(DATA_AXIS), P(DATA_AXIS)))

  def grid_step(states, frozen_params, batches, rngs):
    _check_divisible((states, batches, rngs), mesh, "grid runs (leading axis R)")
    return sharded(states, frozen_params, batches, rngs)

  return jax.jit(grid_step, donate_argnums=(0,))
