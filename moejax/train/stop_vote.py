"""Processes agree on stopping: every process casts its stop flag at each step boundary, the
flags are combined on the devices (a max over one scalar per device), and each process reads the
previous boundary's result, so all stop at the same boundary whenever the signals came, and no
process waits for the step in flight (the host stays one step ahead of the devices)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class StopVote:
  """One vote per step boundary over every device of `mesh`; decisions lag one boundary."""

  def __init__(self, mesh):
    self._votes = NamedSharding(mesh, P(mesh.axis_names))   # [devices]: one per device
    self._shape = (mesh.devices.size,)
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    self._pending = None

  def cast(self, stop: bool) -> bool:
    """Casts this process's flag for this boundary; True when the previous boundary's votes
    said stop (the same answer on every process)."""
    mine = np.full((1,), int(stop), np.int32)
    votes = jax.make_array_from_callback(self._shape, self._votes, lambda _: mine)
    previous, self._pending = self._pending, self._max(votes)
    return previous is not None and bool(previous)
