"""The device mesh and globally sharded arrays: every device of every host on one ``data`` axis."""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(devices: Optional[list] = None) -> jax.sharding.Mesh:
    """All devices of all hosts (or the given ones) on one ``data`` axis."""
    devices = devices or jax.devices()
    return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The same value on every device (learned rows, optimizer state, frozen weights)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P("data"))


def as_global(host: dict, size: int, mesh: jax.sharding.Mesh) -> dict:
    """This process's rows of a batch of global ``size`` -> arrays sharded over ``data``."""
    sharding = batch_sharded(mesh)
    return jax.tree_util.tree_map(lambda v: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:]), host)
