"""The device mesh and the one table that maps logical axes onto mesh axes.

Model code names logical axes only ('vocab', 'embed', 'heads', 'experts', 'stage', ...);
`RULES` places them on the mesh axes defined here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Layout, MeshShape
from moejax.errors import ConfigError
from moejax.errors import MoejaxError

DP = 'dp'
TP = 'tp'
PP = 'pp'
# The Mesh's axis order, which is also its device order: tp innermost, so tensor-parallel
# neighbours are adjacent device ids (same NVLink island), dp outermost (across hosts first). The
# device grid is then a plain reshape of the device list (XLA:GPU takes only such 'iota' device
# assignments), and shard_maps nested pp-outside, tp-inside name their manual axes in mesh order
# (XLA's named_sharding aborts on 'Manual axes must be sorted by mesh axis index' otherwise).
AXES = (DP, PP, TP)

# Logical axis -> mesh axis. One table for params and activations; no fallbacks.
RULES: tuple[tuple[str, str | None], ...] = (
    # parameters
    ('vocab', TP),        # embedding rows, LM head columns: vocab-parallel
    ('embed', None),      # d_model
    ('heads', TP),        # q/k/v column split, output projection row split
    ('kv_heads', TP),     # grouped-query key/value heads (replicated when tp does not divide them)
    ('head_dim', None),
    ('latent', None),     # MLA's query and key/value latents (shared by every head)
    ('experts', TP),      # expert parallelism inside a stage
    ('mlp', None),        # expert hidden width (experts are already split)
    ('shared_mlp', TP),   # shared expert's hidden width: column/row split like heads
    ('dense_mlp', TP),    # dense blocks' MLP hidden width, split alike
    ('pos', None),
    ('stage', PP),        # pipeline stage axis of stacked blocks
    ('repeat', None),
    ('layers', None),
    # activations
    ('act_micro', PP),    # micro-batch axis outside the pipeline
    ('act_batch', DP),    # sequences of a micro-batch: data parallel
    ('act_seq', TP),      # sequence parallelism for the residual stream
    ('act_embed', None),
    ('act_heads', TP),
    ('act_kv_heads', TP),
    ('act_shared_mlp', TP),
    ('act_dense_mlp', TP),
    ('act_vocab', TP),
    ('act_groups', TP),   # routing groups: tokens are split over tp before the all-to-all
)


Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def rules_for(lay: Layout | None, kv_heads: int = 0, shared_d_ff: int = 0,
              dense_d_ff: int = 0) -> Rules:
  """RULES, with experts over (dp, tp) when the layout folds expert parallelism over dp, and
  key/value heads (the shared expert's, the dense blocks' hidden units) replicated when tp does
  not divide their number `kv_heads` (`shared_d_ff`, `dense_d_ff`)."""
  if lay is None:
    return RULES
  place = dict(RULES)
  if lay.experts_over_dp:
    place['experts'] = (DP, TP)
  if kv_heads % lay.tp:
    place['kv_heads'] = place['act_kv_heads'] = None
  if shared_d_ff % lay.tp:
    place['shared_mlp'] = place['act_shared_mlp'] = None
  if dense_d_ff % lay.tp:
    place['dense_mlp'] = place['act_dense_mlp'] = None
  return tuple(place.items())


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('dp', 'pp', 'tp'); tp neighbours are adjacent devices, dp outermost."""
  devices = list(jax.devices() if devices is None else devices)
  if shape.devices > len(devices):
    raise ConfigError(
        f'mesh.dp * mesh.tp * mesh.pp = {shape.dp}*{shape.tp}*{shape.pp} = {shape.devices} '
        f'devices, but only {len(devices)} are available ({devices[0].platform}); shrink the '
        f'mesh or run on more devices.')
  grid = np.array(devices[:shape.devices]).reshape(shape.dp, shape.pp, shape.tp)   # [dp, pp, tp]
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[Mesh]:
  """Makes `mesh` and the logical-axis `rules` current for tracing model code (called by
  moejax.train.plan: Plan.active, and plan.bare for one layer outside a run)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield mesh


def spec(logical: Sequence[str | None]) -> P:
  """PartitionSpec of mesh axes for logical axis names, under the active rules (an error when
  none are active: the placement depends on the run's layout, e.g. experts folded over dp)."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    raise MoejaxError(f'Logical axes {tuple(logical)} placed with no plan active: build a '
                      f'moejax.train.plan.Plan and trace under plan.active() (or plan.jit).')
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def platform() -> str:
  """Platform the active mesh's devices compile for ('cpu', 'cuda', ...), else JAX's default."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def axes_of(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, 'tp' or ('dp', 'tp')) as a tuple."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def restrict(p: P, axes: tuple[str, ...]) -> P:
  """A PartitionSpec with every mesh axis outside `axes` removed (a shard_map's manual view)."""
  def one(entry):
    kept = tuple(a for a in axes_of(entry) if a in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept
  return P(*(one(entry) for entry in p))


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
