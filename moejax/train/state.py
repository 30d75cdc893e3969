"""The train state and its shardings, created directly sharded (never whole on one device)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Layout, ModelConfig
from moejax.model import transformer
from moejax.parallel import mesh as mesh_lib


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # blocks in the stage-stacked training layout
  opt_state: Any


def shardings(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
              mesh: Mesh) -> TrainState:
  """NamedShardings of every leaf of the train state."""
  with mesh_lib.activate(mesh, mesh_lib.rules_for(lay)):
    param_sh = mesh_lib.tree_shardings(mesh, transformer.param_axes(cfg, lay))
    abstract_params = jax.eval_shape(lambda k: transformer.init(cfg, lay, k), jax.random.key(0))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(step=NamedSharding(mesh, P()), params=param_sh,
                    opt_state=opt_shardings(lay, tx, param_sh, abstract_params, abstract_opt))


def opt_shardings(lay: Layout, tx: optax.GradientTransformation, param_sh: Any,
                  param_shapes: Any, opt_shapes: Any) -> Any:
  """Optimizer-state shardings: moments like their params (split over dp as well with
  mesh.shard_optimizer), everything else (counts) replicated."""
  moment_sh = param_sh
  if lay.shard_optimizer and lay.dp > 1:
    moment_sh = jax.tree.map(lambda s, a: over_dp(s, a.shape), param_sh, param_shapes)
  replicated = NamedSharding(jax.tree.leaves(param_sh)[0].mesh, P())
  return optax.tree_map_params(tx, lambda _, s: s, opt_shapes, moment_sh,
                               transform_non_params=lambda _: replicated)


def over_dp(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """`sharding` further split over dp on the first free dimension dp divides (ZeRO-1).

  Leaves already split over dp, or with no such dimension (small vectors), keep `sharding`.
  """
  mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  used = {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
  if mesh_lib.DP in used:
    return sharding
  for i, (entry, size) in enumerate(zip(spec, shape)):
    split = 1 if entry is None else int(np.prod(
        [mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,))]))
    if size % (split * mesh.shape[mesh_lib.DP]) == 0:
      new = mesh_lib.DP if entry is None else (
          (mesh_lib.DP,) + (entry if isinstance(entry, tuple) else (entry,)))
      return NamedSharding(mesh, P(*spec[:i], new, *spec[i + 1:]))
  return sharding


def _init_fn(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation):
  def init(key):
    params = transformer.init(cfg, lay, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
             mesh: Mesh) -> TrainState:
  """The train state as ShapeDtypeStructs with shardings (nothing allocated)."""
  sh = shardings(cfg, lay, tx, mesh)
  with mesh_lib.activate(mesh, mesh_lib.rules_for(lay)):
    shapes = jax.eval_shape(_init_fn(cfg, lay, tx), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)


def create(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation, mesh: Mesh,
           seed: int) -> TrainState:
  """Fresh state from `seed`, materialised shard by shard on `mesh`."""
  with mesh_lib.activate(mesh, mesh_lib.rules_for(lay)):
    return jax.jit(_init_fn(cfg, lay, tx), out_shardings=shardings(cfg, lay, tx, mesh))(jax.random.key(seed))
