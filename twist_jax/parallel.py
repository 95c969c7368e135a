"""Device mesh and the worker map: `shard_map` over devices wrapping `vmap` over local workers.

Everything that knows about devices lives here; the math (model, subnets, aggregation) does not.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from twist_jax.errors import ConfigError

AXIS = "worker"


def device_count_for(workers: int, requested: int = 0, available: int | None = None) -> int:
  """Devices of the worker mesh: `requested` (must divide W), or the most that divide W."""
  available = available or jax.device_count()
  if requested:
    if requested > available:
      raise ConfigError("twist.devices", f"got {requested}; only {available} devices are visible")
    if workers % requested:
      raise ConfigError("twist.devices", f"got {requested}; it must divide twist.workers={workers}")
    return requested
  return max(d for d in range(1, min(workers, available) + 1) if workers % d == 0)


def make_mesh(num_devices: int, devices=None) -> Mesh:
  """A 1-D mesh over `num_devices` devices (all processes' devices, in order)."""
  devices = list(devices if devices is not None else jax.devices())[:num_devices]
  return Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def worker_sharded(mesh: Mesh) -> NamedSharding:
  """Leading W axis split over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def sum_over_workers(fn, mesh: Mesh, in_axes):
  """shard_map over devices of `fn`, which sees this device's workers (leading axis w) and
  returns (to_sum, per_worker): `to_sum` (e.g. the device's sum of worker changes and holder
  counts) is added over the mesh with one psum and comes back replicated; `per_worker` keeps
  its leading axis, split over the mesh. `in_axes`: 0 = per-worker, None = replicated.
  """
  spec = lambda a: P() if a is None else P(AXIS)

  def device_fn(*args):
    to_sum, per_worker = fn(*args)
    return jax.lax.psum(to_sum, AXIS), per_worker

  return jax.shard_map(device_fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_axes),
                       out_specs=(P(), P(AXIS)), check_vma=False)


def initialize_distributed(coordinator: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
  """Joins JAX's multi-controller runtime when asked to (flags, or the environment variables
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a SLURM job step, which
  JAX detects itself). Must run before anything touches a device. Returns True if it did."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  in_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (coordinator or num_processes > 1 or in_slurm):
    return False
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU needs gloo across hosts
  kw = {}
  if coordinator:
    kw = dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id)
  jax.distributed.initialize(**kw)
  return True
