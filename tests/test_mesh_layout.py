"""The ('data', 'model') mesh follows the hardware (parallel.device_grid): on simulated device lists
(fake devices carrying process_index, slice_index and TPU coordinates) no 'model' group crosses a slice or
a GPU node where the layout allows it, a model_parallel that cannot be placed so is refused naming the
divisor to use, and on this machine's CPU devices the mesh is the row-major one of before (the sharded
steps' equality with one device is tests/test_sharding.py's)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from mpt_jax import parallel


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  platform: str = "gpu"
  device_kind: str = "NVIDIA H100 80GB HBM3"
  slice_index: int | None = None
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0


def gpu_nodes(nodes: int = 4, per_node: int = 8) -> list[FakeDevice]:
  """One process per GPU (SLURM), each node a slice as the runtime reports it, listed interleaved."""
  devices = [
    FakeDevice(id=node * per_node + g, process_index=node * per_node + g, slice_index=node)
    for g, node in itertools.product(range(per_node), range(nodes))
  ]
  return devices


def tpu_slices(slices: int = 2) -> list[FakeDevice]:
  """`slices` v4 slices of 2x2x1 chips (one host each)."""
  return [
    FakeDevice(
      id=s * 4 + i,
      process_index=s,
      platform="tpu",
      device_kind="TPU v4",
      slice_index=s,
      coords=(i % 2, i // 2, 0),
    )
    for s in range(slices)
    for i in range(4)
  ]


def test_no_model_group_crosses_a_gpu_node():
  for model_parallel in (1, 2, 4, 8):
    grid = parallel.device_grid(gpu_nodes(), model_parallel)
    assert grid.shape == (32 // model_parallel, model_parallel)
    assert sorted(d.id for d in grid.flat) == list(range(32))
    assert all(len({d.slice_index for d in row}) == 1 for row in grid)


def test_a_model_group_wider_than_a_node_is_refused():
  with pytest.raises(
    ValueError, match=r"model_parallel=16: a 'model' group would span slices .*divisor of 8"
  ):
    parallel.device_grid(gpu_nodes(), 16)
  with pytest.raises(ValueError, match="divisor of 8"):
    parallel.device_grid(gpu_nodes(), 3)


def test_processes_without_slices_group_whole_processes():
  devices = [FakeDevice(id=i, process_index=i) for i in range(8)]  # one GPU each, nodes unknown
  grid = parallel.device_grid(devices, 4)
  assert [[d.id for d in row] for row in grid] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  hosts = [FakeDevice(id=i, process_index=i // 4, platform="cpu") for i in range(8)]
  with pytest.raises(ValueError, match="span processes"):
    parallel.device_grid(hosts, 3)


def test_a_two_slice_tpu_keeps_every_model_group_in_one_slice():
  grid = parallel.device_grid(tpu_slices(), 4)
  assert grid.shape == (2, 4)
  assert all(len({d.slice_index for d in row}) == 1 for row in grid)
  grid = parallel.device_grid(tpu_slices(), 2)
  assert grid.shape == (4, 2) and all(len({d.slice_index for d in row}) == 1 for row in grid)
  with pytest.raises(ValueError, match="span slices"):
    parallel.device_grid(tpu_slices(), 8)


def test_on_this_machines_devices_the_mesh_is_row_major_as_before():
  devices = jax.devices()
  mesh = parallel.make_mesh(model_parallel=len(devices))
  assert np.array_equal(mesh.devices, np.asarray(devices).reshape(1, len(devices)))
  mesh = parallel.make_mesh(model_parallel=1)
  assert np.array_equal(mesh.devices, np.asarray(devices).reshape(len(devices), 1))
