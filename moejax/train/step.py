"""One jitted, state-donating train step and an eval step; both pure functions of their inputs."""
from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Layout, ModelConfig
from moejax.model import moe as moe_lib, transformer
from moejax.parallel import pipeline as pipeline_lib
from moejax.parallel import mesh as mesh_lib
from moejax.train.state import TrainState

DROPOUT_TAG = 7


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches [M, B, T+1]: micro-batches split over pp, sequences over dp."""
  return NamedSharding(mesh, mesh_lib.spec(('act_micro', 'act_batch', None)))


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_TAG), step)


def make_train_step(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, state_sharding: TrainState,
                    seed: int) -> Callable:
  """jit(train_step)(state, tokens [M, B, T+1]) -> (state, metrics); state is donated."""
  def train_step(state: TrainState, tokens: jax.Array):
    grad_fn = jax.value_and_grad(transformer.loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens, step_rng(seed, state.step),
                                     cfg=cfg, lay=lay, train=True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg.bias_update_rate > 0:   # aux-loss-free balancing: not a gradient step
      params = _nudge_select_bias(params, metrics['expert_assigned'], cfg.bias_update_rate, lay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                   out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
  return _under_mesh(jitted, mesh, mesh_lib.rules_for(lay))


def make_eval_step(cfg: ModelConfig, lay: Layout, mesh: Mesh, param_sharding) -> Callable:
  """jit(eval_step)(params, tokens) -> metrics, with the eval capacity factor and no dropout."""
  def eval_step(params, tokens):
    loss, metrics = transformer.loss_fn(params, tokens, jax.random.key(0), cfg=cfg, lay=lay,
                                        train=False)
    return dict(metrics, loss=loss)
  jitted = jax.jit(eval_step, in_shardings=(param_sharding, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))
  return _under_mesh(jitted, mesh, mesh_lib.rules_for(lay))


def _nudge_select_bias(params, assigned: jax.Array, rate: float, lay: Layout):
  """params with each MoE layer's selection bias nudged by the step's loads [NB, E]."""
  moe = params['blocks']['moe']
  delta = pipeline_lib.to_stages(moe_lib.select_bias_step(assigned, rate),  # [NB, E] ->
                                 lay.pp, lay.repeats)                      # [S, R, L, E]
  moe = dict(moe, select_bias=moe['select_bias'] + delta)
  return dict(params, blocks=dict(params['blocks'], moe=moe))


class _under_mesh:
  """Calls (and lowers) a jitted function with the mesh and logical rules active."""

  def __init__(self, jitted, mesh: Mesh, rules: mesh_lib.Rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, *args):
    with mesh_lib.activate(self.mesh, self.rules):
      return self.jitted(*args)

  def lower(self, *args):
    with mesh_lib.activate(self.mesh, self.rules):
      return self.jitted.lower(*args)
