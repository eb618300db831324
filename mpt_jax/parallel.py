"""The device mesh ('data', 'model') and the steps on it, written per device with `jax.shard_map`.

- 'data': data parallelism. Training steps (PT/MTL/MAML/FoMAML/Reptile): the batch's leading axis
  (tasks of a meta-batch, examples of a PT/MTL batch) is split over it; the state and rng are
  replicated. The per-device step (built with `axis_name=DATA_AXIS`) averages its gradient across the
  axis exactly once (mpt_jax/algorithms/common.py explains the check_vma trap it avoids), so every
  device applies the same update and the state stays replicated. Downstream grid: R independent runs
  (each its own prompt, optimizer state and learning rate) split along the run axis; no reduction.
- 'model': the frozen T5's weights are split over it by name (mpt_jax/sharding.py), so a model too big
  for one device fits on `model_parallel` of them. shard_map is manual over 'data' only
  (`axis_names={'data'}`): inside the per-device step 'model' stays automatic, the weights keep their
  sharding, and XLA partitions each layer's matmuls over it (tensor parallelism); the step's code is
  the same whatever the size of either axis. Size 1 (the default): every device holds every weight.

Several processes (a TPU pod's hosts, a multi-node GPU job; `python -m mpt_jax.main --multihost`):
`jax.distributed.initialize()` first; the mesh then spans every process's devices. Every process runs
the same program on the same host-side state (so that all take part in each collective); each builds
and transfers only the rows of a batch its own devices hold (`process_rows`, `fed_by_process`,
`RunLayout`), and reads back what spans other processes' devices with `to_host` (a collective). Only
the primary process (`is_primary`) writes results, prompts and logs; every process takes part in the
orbax checkpoints, which each save collectively.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mpt_jax import methods, sharding
from mpt_jax.algorithms import common

DATA_AXIS = "data"
MODEL_AXIS = sharding.MODEL_AXIS


def make_mesh(
  devices: Sequence[jax.Device] | None = None, num_devices: int = 0, model_parallel: int = 1
) -> Mesh:
  """A 2-D mesh ('data', 'model') over `devices` (default: all), or their first `num_devices` (0: all),
  with `model_parallel` devices on the 'model' axis and the rest of the factor on 'data'.

  Devices keep their order (jax.devices(): process by process), row-major: a 'model' group is
  consecutive devices, within one host while model_parallel <= its devices (its collectives stay on
  the host's fast links), and each process's 'data' rows are one block (`process_rows`)."""
  devices = list(jax.devices() if devices is None else devices)
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices}: only {len(devices)} device(s) here")
    devices = devices[:num_devices]
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(
      f"model_parallel={model_parallel}: the {len(devices)} device(s) do not split into groups of "
      f"{model_parallel}; use a divisor of {len(devices)}"
    )
  grid = device_grid(devices, model_parallel)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def _granule(device) -> int:
  """The unit a 'model' group must not leave: a TPU slice (slice_index), else a process's host."""
  slice_index = getattr(device, "slice_index", None)
  return device.process_index if slice_index is None else slice_index


def _process_blocks(grid: np.ndarray) -> bool:
  """Whether every process's devices fill consecutive whole rows of `grid` (as `process_rows` needs)."""
  owners = [{d.process_index for d in row} for row in grid]
  if any(len(o) > 1 for o in owners) and any(len(o) == 1 for o in owners):
    return False
  order = [min(o) for o in owners]
  seen, last = set(), None
  for p in order:
    if p != last and p in seen:
      return False
    seen.add(p)
    last = p
  return True


def device_grid(devices: Sequence, model_parallel: int) -> np.ndarray:
  """The (data, model) array of `devices` for the mesh, following the hardware.

  On TPU, JAX's topology-aware utilities place it: `mesh_utils.create_device_mesh` (one slice: the
  'model' axis follows the ICI torus) or `create_hybrid_device_mesh` (several slices: 'data' spans them
  over DCN, every 'model' group inside one slice). Elsewhere (GPU nodes, CPU), devices are grouped by
  slice (a GPU node where the runtime reports one) or process, in their order, and laid out row-major, so
  a 'model' group is consecutive devices of one group. A 'model' group that would cross a slice or node
  boundary (model_parallel not dividing each group's devices) is refused: its frozen-weight collectives
  would run over the slower network every step."""
  devices = sorted(devices, key=lambda d: (_granule(d), d.process_index))  # stable: order kept within
  sizes = {}
  for d in devices:
    sizes[_granule(d)] = sizes.get(_granule(d), 0) + 1
  per_group = min(sizes.values())
  where, plural = (
    ("slice", "slices") if getattr(devices[0], "slice_index", None) is not None else ("process", "processes")
  )
  # Processes without slices (one process per GPU under SLURM, CPU): a group of whole processes is fine
  # (consecutive ranks: one node's, under SLURM's block distribution); a process split across is not.
  within = all(size % model_parallel == 0 for size in sizes.values())
  whole_processes = where == "process" and len(set(sizes.values())) == 1 and model_parallel % per_group == 0
  if not (within or whole_processes):
    raise ValueError(
      f"model_parallel={model_parallel}: a 'model' group would span {plural} ({len(sizes)} {plural} of "
      f"{sorted(set(sizes.values()))} device(s)); use a divisor of {per_group} so that each group stays "
      f"within one {where}"
    )
  rows = len(devices) // model_parallel
  if devices[0].platform == "tpu" and len(devices) > 1:  # (slices: granules known)
    from jax.experimental import mesh_utils

    try:
      if len(sizes) > 1 and where == "slice":
        grid = mesh_utils.create_hybrid_device_mesh(
          (per_group // model_parallel, model_parallel),
          (len(sizes), 1),
          devices,
          allow_split_physical_axes=True,
        )
      else:
        grid = mesh_utils.create_device_mesh(
          (rows, model_parallel), devices, contiguous_submeshes=True, allow_split_physical_axes=True
        )
      if _process_blocks(grid):  # each process's 'data' rows one block: RunLayout's host-local loading
        return grid
      logging.warning(
        "mesh_utils' data %d x model %d splits a process's rows; row-major instead", rows, model_parallel
      )
    except (ValueError, NotImplementedError, AssertionError) as error:
      logging.warning(
        "mesh_utils cannot place data %d x model %d (%s); row-major instead", rows, model_parallel, error
      )
  return np.asarray(devices).reshape(rows, model_parallel)


def describe(mesh: Mesh) -> str:
  """'4 x cpu (ids 0, 1, 2, 3) as data 2 x model 2': the devices a run uses, for its log (and over how
  many processes)."""
  devices = list(mesh.devices.flat)
  kinds = sorted({d.device_kind for d in devices})
  processes = len({d.process_index for d in devices})
  over = f" over {processes} processes" if processes > 1 else ""
  shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
  ids = ", ".join(str(d.id) for d in devices)
  return f"{len(devices)} x {'/'.join(kinds)} (ids {ids}) as {shape}{over}"


def place_frozen(frozen_params, mesh: Mesh, rules: sharding.PartitionRules = sharding.PARTITION_RULES):
  """The frozen weights on the mesh, each split over the 'model' axis by its partition rule (the model's
  `partition_rules`, default T5's; mpt_jax/sharding.py) and whole along 'data'; from host arrays, each
  device receiving only its part."""
  specs = sharding.frozen_specs(frozen_params, mesh.shape[MODEL_AXIS], rules)
  return place(frozen_params, sharding.shardings(mesh, specs))


# --- processes ---------------------------------------------------------------------------------------------


def is_primary() -> bool:
  """Whether this process writes the run's files (results, prompts, logs, records): process 0."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_SAYING_BYTES = 4096  # the longest error message the primary's verdict carries (longer: cut)


def primary_says(fn: Callable[[], Any], refusals: tuple[type[Exception], ...]) -> None:
  """Runs `fn` on the primary process only, and makes every process share its outcome: when it raised one
  of `refusals` (by isinstance, the first that fits), every process raises that class with the primary's
  message; any other error of the primary is re-raised there and raised as a RuntimeError elsewhere. A
  collective (every process must call it at the same point), so that the other processes stop with the
  primary instead of waiting for it at the next `sync`. A single process runs `fn` alone."""
  if jax.process_count() == 1:
    fn()
    return
  kind, text, failure = 0, b"", None
  if is_primary():
    try:
      fn()
    except Exception as error:  # noqa: BLE001 (every outcome is told to the others)
      failure = error
      fits = [i for i, refusal in enumerate(refusals) if isinstance(error, refusal)]
      kind = 1 + fits[0] if fits else len(refusals) + 1
      text = (str(error) if fits else f"{type(error).__name__}: {error}").encode()[:_SAYING_BYTES]
  message = np.zeros(_SAYING_BYTES, np.uint8)
  message[: len(text)] = np.frombuffer(text, np.uint8)
  verdict = multihost_utils.broadcast_one_to_all({"kind": np.int32(kind), "message": message})
  kind = int(verdict["kind"])
  if failure is not None:
    raise failure
  if kind:
    said = bytes(np.asarray(verdict["message"], np.uint8)).rstrip(b"\0").decode(errors="replace")
    if kind <= len(refusals):
      raise refusals[kind - 1](said)
    raise RuntimeError(f"the primary process (process 0) failed: {said}")


def to_host(tree):
  """Host (numpy) copies of a tree's arrays. An array split over other processes' devices is gathered
  from them: a collective, so every process must call this at the same point of the run."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def process_rows(mesh: Mesh, size: int) -> slice:
  """The rows of a leading axis of `size`, split over the mesh's data axis, that this process's devices
  hold: the only rows it builds and transfers. Contiguous for a mesh of `make_mesh` (devices in process
  order)."""
  _check_size(size, mesh, "batch")
  index_map = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((size,))
  spans = sorted({index[0].indices(size)[:2] for index in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(
      f"this process's devices hold rows {spans} of the data axis, not one block; build the mesh with "
      f"parallel.make_mesh (devices in process order)"
    )
  return slice(start, stop)


def put_process_rows(tree, mesh: Mesh, size: int):
  """Global arrays of leading size `size`, split over the data axis, from this process's rows of them
  (`process_rows(mesh, size)`, host arrays): nothing of other processes' rows is built or sent here."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (size, *x.shape[1:]))

  return jax.tree.map(put, tree)


def fed_by_process(sample: Callable[..., Any], size: int, mesh: Mesh) -> Callable[[int], Any]:
  """batch(step) from a sampler `sample(step, rows=slice)` of a leading axis of `size`: global arrays
  split over the data axis, each process building only its own rows (`process_rows`)."""
  rows = process_rows(mesh, size)
  return lambda step: put_process_rows(sample(step, rows=rows), mesh, size)


def padded_runs(num_runs: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's data axis that holds `num_runs` runs."""
  n = mesh.shape[DATA_AXIS]
  return -(-num_runs // n) * n


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """R independent runs (the downstream grid's, or prompts decoded together) on the mesh: padded to a
  multiple of the data axis by repeating the last run, and split over it. Each process builds and
  transfers only the runs its devices hold (`local`: run indices, the padding repeating R - 1);
  `to_host` gathers the R runs back. Without a mesh, runs stay where they are (one device)."""

  mesh: Mesh | None
  num_runs: int

  @property
  def padded(self) -> int:
    return self.num_runs if self.mesh is None else padded_runs(self.num_runs, self.mesh)

  @functools.cached_property
  def local(self) -> np.ndarray:
    if self.mesh is None:
      return np.arange(self.num_runs)
    rows = process_rows(self.mesh, self.padded)
    return np.minimum(np.arange(rows.start, rows.stop), self.num_runs - 1)

  def put(self, tree):
    """Global arrays [padded, ...] from host arrays of all R runs (only this process's rows are sent)."""
    if self.mesh is None:
      return tree
    return self.put_local(jax.tree.map(lambda x: np.asarray(x)[self.local], tree))

  def put_local(self, tree):
    """Global arrays [padded, ...] from host arrays of this process's runs (`local`) only."""
    return tree if self.mesh is None else put_process_rows(tree, self.mesh, self.padded)

  def to_host(self, tree):
    """Host arrays [R, ...] of the runs (a collective across processes; see `to_host`)."""
    return jax.tree.map(lambda x: x[: self.num_runs], to_host(tree))


def _pad_leading(tree, size: int, xp=np):
  """Every array of `tree` with its leading axis padded to `size` by repeating its last entry."""

  def pad(x):
    extra = size - x.shape[0]
    return x if extra == 0 else xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)])

  return jax.tree.map(pad, tree)


def place(tree, shardings):
  """Host arrays (or arrays of this process) put on the mesh, each with its sharding (one for all, or a
  tree of them): every device receives only its own part, taken from this process's copy. Unlike
  `jax.device_put` in a multi-process run, nothing is compared across processes (that gathers every
  array from every host): each process must hold the same values (the same checkpoint, the same
  computed initial state)."""

  def put(x, target):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys
      return jax.random.wrap_key_data(put(jax.random.key_data(x), target), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def replicate(tree, mesh: Mesh):
  """Put a full copy of `tree` on every device of the mesh (e.g. the upstream state)."""
  return place(tree, NamedSharding(mesh, P()))


def shard(tree, mesh: Mesh, what: str = "batch"):
  """Split every array of `tree` along its leading axis over the mesh's data axis (from a full copy in
  this process; `put_process_rows` builds a batch from this process's rows only)."""
  _check_divisible(tree, mesh, what)
  return place(tree, NamedSharding(mesh, P(DATA_AXIS)))


def _check_divisible(tree, mesh: Mesh, what: str) -> None:
  _check_size(common.leading_size(tree, what), mesh, what)


def _check_size(size: int, mesh: Mesh, what: str) -> None:
  num_devices = mesh.shape[DATA_AXIS]
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
    per_device_step,
    mesh=mesh,
    in_specs=(P(), P(), P(DATA_AXIS), P()),
    out_specs=(P(), P()),
    axis_names={DATA_AXIS},  # 'model' stays automatic: the frozen params keep their sharding over it
  )

  def step(state, frozen_params, batch, rng):
    _check_divisible(batch, mesh, "batch")  # at trace time: shapes are static
    return sharded(state, frozen_params, batch, rng)

  return jax.jit(step, donate_argnums=(0,))


def make_sharded_step(method: str, loss_fn, optimizer, mesh: Mesh, **kwargs) -> common.StepFn:
  """The jitted data-parallel step of `method` (kwargs as for `mpt_jax.methods.make_step`)."""
  return shard_step(methods.make_step(method, loss_fn, optimizer, axis_name=DATA_AXIS, **kwargs), mesh)


def shard_grid_step(step: common.StepFn, mesh: Mesh, runs_at_once: int | None = None) -> common.StepFn:
  """Jitted grid step: R runs of the (unsharded, axis_name=None) `step`, split over devices by run.

  `grid_step(states [R], frozen_params, batches [R, ...], rngs [R])`. Each device vmaps its share of the
  runs (or maps over them, `runs_at_once` at a time: `common.make_grid_step`); runs are independent, so
  nothing is reduced across devices. When R does not divide over the
  devices, the runs are padded (the last one repeated) inside the step and the padding dropped from
  what it returns, so no device idles and the results are those of the R runs.
  """
  grid = common.make_grid_step(step, runs_at_once)
  sharded = jax.shard_map(
    grid,
    mesh=mesh,
    in_specs=(P(DATA_AXIS), P(), P(DATA_AXIS), P(DATA_AXIS)),
    out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
    axis_names={DATA_AXIS},
  )

  def grid_step(states, frozen_params, batches, rngs):
    num_runs = common.leading_size((states, batches, rngs), "grid runs (leading axis R)")
    padded = _pad_leading((states, batches, rngs), padded_runs(num_runs, mesh), jnp)
    out = sharded(padded[0], frozen_params, padded[1], padded[2])
    return jax.tree.map(lambda x: x[:num_runs], out)

  return jax.jit(grid_step, donate_argnums=(0,))
