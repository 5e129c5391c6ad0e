"""Device mesh and shardings for data-parallel training.

One mesh axis, ``data``. Batches are split along it; gates, frozen weights, optimiser and method
state are replicated. In a multi-process run each process passes only its own slice of the
global batch and ``jax.make_array_from_process_local_data`` assembles the global array.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (all by default)."""
    available = jax.device_count()
    n = available if not num_devices else num_devices
    if not 1 <= n <= available:
        raise ValueError(f"num_devices={num_devices}; allowed: 1 to {available} (the devices JAX sees)")
    if jax.process_count() > 1 and n != available:  # a subset could leave a process without devices to feed
        raise ValueError(f"num_devices={num_devices} in a {jax.process_count()}-process run; allowed: 0 (all devices)")
    kwargs = {"devices": jax.devices()[:n]}
    if hasattr(jax.sharding, "AxisType"):
        # Auto axes: jit propagates the batch sharding itself; Explicit would demand annotations.
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((n,), ("data",), **kwargs)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    n = mesh.size
    if batch_size % n:
        raise ValueError(f"batch_size={batch_size} does not divide over {n} devices; allowed: a multiple of {n}")


def process_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    per = global_batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shard_batch(batch: tuple[np.ndarray, ...], mesh: jax.sharding.Mesh) -> tuple[jax.Array, ...]:
    """Global numpy batch (identical on every process) -> arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    rows = process_slice(len(batch[0]))
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)[rows]) for a in batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` on every device of ``mesh`` (gates, frozen weights, optimiser and method state)."""
    return jax.device_put(tree, replicated(mesh))
