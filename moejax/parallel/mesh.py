"""The device mesh and the one table that maps logical axes onto mesh axes.

This is the only module that knows mesh axis names. Model code names logical axes
('vocab', 'embed', 'heads', 'experts', 'stage', ...); `RULES` places them on the mesh.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.config import ConfigError, Layout

TP = 'tp'
PP = 'pp'
# Mesh axes from outermost to innermost in device order; tp is innermost so that tensor-parallel
# neighbours are adjacent device ids (same NVLink island).
AXES_BY_DISTANCE = (PP, TP)

# Logical axis -> mesh axis. One table for params and activations; no fallbacks.
RULES: tuple[tuple[str, str | None], ...] = (
    # parameters
    ('vocab', TP),        # embedding rows, LM head columns: vocab-parallel
    ('embed', None),      # d_model
    ('heads', TP),        # q/k/v column split, output projection row split
    ('head_dim', None),
    ('experts', TP),      # expert parallelism inside a stage
    ('mlp', None),        # expert hidden width (experts are already split)
    ('pos', None),
    ('stage', PP),        # pipeline stage axis of stacked blocks
    ('repeat', None),
    ('layers', None),
    # activations
    ('act_micro', PP),    # micro-batch axis outside the pipeline
    ('act_batch', None),
    ('act_seq', TP),      # sequence parallelism for the residual stream
    ('act_embed', None),
    ('act_heads', TP),
    ('act_vocab', TP),
    ('act_groups', TP),   # routing groups: tokens are split over tp before the all-to-all
)


def make_mesh(tp: int, pp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('tp', 'pp') of shape (tp, pp); tp neighbours are adjacent devices."""
  devices = list(jax.devices() if devices is None else devices)
  need = tp * pp
  if need > len(devices):
    raise ConfigError(
        f'mesh.tp * mesh.pp = {tp}*{pp} = {need} devices, but only {len(devices)} are available '
        f'({devices[0].platform}); shrink the mesh or run on more devices.')
  grid = np.array(devices[:need]).reshape(pp, tp).T  # [tp, pp]
  return Mesh(grid, (TP, PP), axis_types=(AxisType.Auto,) * 2)


def mesh_for(lay: Layout) -> Mesh:
  return make_mesh(lay.tp, lay.pp)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[Mesh]:
  """Makes `mesh` and the logical-axis RULES current for tracing model code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield mesh


def spec(logical: Sequence[str | None]) -> P:
  """PartitionSpec of mesh axes for a tuple of logical axis names."""
  return nn.logical_to_mesh_axes(tuple(logical), RULES)


def sharding(mesh: Mesh, logical: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, spec(logical))


def tree_shardings(mesh: Mesh, logical_tree) -> object:
  """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: sharding(mesh, tuple(s)), logical_tree,
                      is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical axes; a no-op when no mesh is active (shape-only tracing)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(logical))
