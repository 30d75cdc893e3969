"""The train state and its shardings (moejax.train.plan builds them once per run)."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Layout, ModelConfig
from moejax.model import params as params_lib
from moejax.parallel import mesh as mesh_lib


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # blocks in the stage-stacked training layout
  opt_state: Any


def shardings(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
              mesh: Mesh) -> TrainState:
  """NamedShardings of every leaf of the train state (under an active plan's rules)."""
  param_sh = mesh_lib.tree_shardings(mesh, params_lib.param_axes(cfg, lay))
  abstract_params = params_lib.abstract(cfg, lay)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(step=NamedSharding(mesh, P()), params=param_sh,
                    opt_state=opt_shardings(lay, tx, param_sh, abstract_params, abstract_opt))


def canonical_shardings(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
                        mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """Shardings of the train state in the checkpoint layout (blocks [NB, ...], split over pp
  in contiguous chunks), under an active plan's rules."""
  param_sh = mesh_lib.tree_shardings(mesh, params_lib.param_axes(cfg))
  canonical = jax.eval_shape(params_lib.tree_from_stages, abstract_state)
  opt_sh = opt_shardings(lay, tx, param_sh, canonical.params, canonical.opt_state)
  return TrainState(step=NamedSharding(mesh, P()), params=param_sh, opt_state=opt_sh)


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


@functools.lru_cache(maxsize=16)
def init_fn(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation):
  """key -> a fresh TrainState (params in the training layout, zero moments); one function per
  (model, layout, optimizer), so equal plans share its trace and program."""
  def init(key):
    params = params_lib.init(cfg, lay, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
             state_sharding: TrainState) -> TrainState:
  """The train state as ShapeDtypeStructs with shardings (nothing allocated)."""
  params = params_lib.abstract(cfg, lay)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                      opt_state=jax.eval_shape(tx.init, params))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                      state_sharding)
