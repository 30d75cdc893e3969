"""The train step and the eval step as pure functions of their inputs (moejax.train.plan jits
them with the run's shardings; the train state is donated)."""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from moejax import rng as rng_lib
from moejax.config import Layout, ModelConfig
from moejax.model import moe as moe_lib, params as params_lib, transformer
from moejax.parallel import mesh as mesh_lib
from moejax.train.state import TrainState


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches [M, B, T+1]: micro-batches split over pp, sequences over dp."""
  return NamedSharding(mesh, mesh_lib.spec(('act_micro', 'act_batch', None)))


# The step functions are cached by their arguments (all hashable: frozen configs, the plan's
# optimizer and schedule objects): plans of equal configs get the same function, so JAX reuses
# its trace and compiled program instead of tracing it again (a resumed run in one process).
@functools.lru_cache(maxsize=16)
def train_step_fn(cfg: ModelConfig, lay: Layout, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, seed: int) -> Callable:
  """train_step(state, tokens [M, B, T+1]) -> (state, metrics)."""
  def train_step(state: TrainState, tokens: jax.Array):
    grad_fn = jax.value_and_grad(transformer.loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, tokens, rng_lib.dropout_step(seed, state.step),
                                     cfg=cfg, lay=lay, train=True)
    with jax.named_scope('optimizer'):    # names the update's ops in profiles and HLO
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    if cfg.bias_update_rate > 0:   # aux-loss-free balancing: not a gradient step
      params = _nudge_select_bias(params, metrics['expert_preferred'], cfg, lay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


@functools.lru_cache(maxsize=16)
def eval_step_fn(cfg: ModelConfig, lay: Layout) -> Callable:
  """eval_step(params, tokens) -> metrics, with the eval capacity factor and no dropout."""
  def eval_step(params, tokens):
    loss, metrics = transformer.loss_fn(params, tokens, jax.random.key(0), cfg=cfg, lay=lay,
                                        train=False)
    return dict(metrics, loss=loss)
  return eval_step


def _nudge_select_bias(params, preferred: jax.Array, cfg: ModelConfig, lay: Layout):
  """params with each MoE layer's selection bias nudged by the step's loads [NB (+ mtp_depth),
  E] (the choices the biased scores make without in-group balancing: the bias is what inference
  uses)."""
  step = moe_lib.select_bias_step(preferred, cfg.bias_update_rate, cfg.bias_update_rule)
  nudge = lambda moe, delta: dict(moe, select_bias=moe['select_bias'] + delta)
  blocks = params['blocks']
  out = dict(params, blocks=dict(blocks, moe=nudge(blocks['moe'], params_lib.to_stages(
      step[:cfg.num_blocks], lay.pp, lay.repeats))))                   # [NB, E] -> [S, R, L, E]
  if cfg.mtp_depth:
    mtp = params['mtp']
    out['mtp'] = dict(mtp, block=dict(mtp['block'], moe=nudge(mtp['block']['moe'],
                                                              step[cfg.num_blocks:])))
  return out
