"""The whole language model: embedding, pipelined blocks, vocab-parallel head and loss.

Parameters (moejax.model.params): {'embed': Embedder, 'blocks': stage-stacked Block params
[S, R, L, ...], 'head': Head}. The same code runs on every mesh; the mesh only changes where
things live.
Legend: M micro-batches, B batch (a micro-batch's sequences), T sequence, D d_model,
V vocabulary (Vp padded), E experts, NB blocks, S pipeline stages, R circular repeats,
L layers per stage.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moejax import rng as rng_lib
from moejax.config import Layout, ModelConfig, layers_per_stage
from moejax.model import params as params_lib
from moejax.model import layers
from moejax.model.layers import Block, Embedder, Head
from moejax.parallel import pipeline as pipeline_lib
from moejax.parallel import remat
from moejax.parallel.mesh import constrain

def _layer_stats(stats) -> dict[str, jax.Array]:
  """Per-group stats of one block on one micro-batch -> per-layer sums/means."""
  return {
      'aux': jnp.mean(stats.aux),                                       # mean over groups
      'z': jnp.mean(stats.z),
      'assigned': jnp.sum(stats.assigned, axis=(0, 1)).astype(jnp.float32),  # [E]
      'kept': jnp.sum(stats.kept, axis=(0, 1)).astype(jnp.float32),          # [E]
      'preferred': jnp.sum(stats.preferred, axis=(0, 1)).astype(jnp.float32),  # [E]
      'rerouted': jnp.sum(stats.rerouted).astype(jnp.float32),
  }


def _stage_fn(cfg: ModelConfig, lay: Layout, train: bool):
  per_stage = layers_per_stage(cfg, lay)
  block = Block(cfg, train)

  def stage_fn(params, x, micro, repeat, stage, rng, packed):  # x [B, T, D]
    """params: [L, ...] (scanned), or unrolled a tuple of L per-layer trees."""
    first = (repeat * lay.pp + stage) * per_stage   # global index of this stage's first block
    positions, segments = (None, None) if packed is None else packed   # [B, T] each
    def layer(x, inputs):
      p, l = inputs
      y, stats = block.apply({'params': p}, x, positions, segments, cfg.block_layer(first + l),
                             rngs={'dropout': rng_lib.dropout_block(rng, micro, first + l)})
      return y, _layer_stats(stats)

    if not lay.unroll_layers:
      return jax.lax.scan(layer, x, (params, jnp.arange(per_stage)))
    stats = []
    for l, p in enumerate(params):
      x, s = layer(x, (p, l))
      stats.append(s)
    return x, jax.tree.map(lambda *s: jnp.stack(s), *stats)           # stats [L, ...]
  return stage_fn


def _dense_blocks(params, x: jax.Array, cfg: ModelConfig, lay: Layout, train: bool,
                  packed: Any) -> jax.Array:
  """x [M, B, T, D] through the dense blocks (params [dense_blocks, ...], replicated over pp)
  before the pipeline, on each micro-batch."""
  block = Block(cfg, train, dense=True)

  def one(params, xs):                                          # x [B, T, D], packed [B, T]
    x, (positions, segments) = xs
    def layer(x, inputs):
      p, l = inputs
      return block.apply({'params': p}, x, positions, segments, l)[0], None
    return jax.lax.scan(layer, x, (params, jnp.arange(cfg.dense_blocks)))[0]

  side = (None, None) if packed is None else packed
  x = pipeline_lib.each_micro_batch(one, params, (x, side), lay.pp)
  return constrain(x, ('act_micro',) + layers.RESIDUAL)


def _cross_entropy_sum(head_params, hidden: jax.Array, labels: jax.Array,
                       cfg: ModelConfig, lay: Layout) -> jax.Array:
  """Vocab-parallel CE summed over tokens. hidden [S, B, T, D], labels [S, B, T] (-1: skip).
  The logits' gradient is kept for the backward pass where the remat policy keeps matmul
  outputs, else the logits are recomputed."""
  hidden = constrain(hidden, ('act_micro', 'act_batch', None, 'act_embed'))
  return Head(cfg).apply({'params': head_params}, hidden, labels,
                         ('act_micro', 'act_batch', None, 'act_vocab'),
                         remat.keeps_matmul_outputs(lay.remat_policy))


def _chunks(a: jax.Array, stages: int) -> jax.Array:
  """[M, ...] -> [M/S, S, ...]: one micro-batch per stage in each chunk."""
  return jnp.swapaxes(a.reshape((stages, a.shape[0] // stages) + a.shape[1:]), 0, 1)


def _chunked_cross_entropy_sum(head_params, hidden: jax.Array, labels: jax.Array,
                               cfg: ModelConfig, lay: Layout) -> jax.Array:
  """_cross_entropy_sum of hidden [M, B, T, D] in chunks of one micro-batch per stage, so the
  vocab-sized logits exist for one chunk at a time. The M/pp chunks are unrolled: in a loop, the
  gradients each chunk keeps would be stacked, copied in and out of the stack and zeroed first."""
  hidden, labels = _chunks(hidden, lay.pp), _chunks(labels, lay.pp)  # [M/S, S, B, T, ...]
  return sum(_cross_entropy_sum(head_params, hidden[i], labels[i], cfg, lay)
             for i in range(hidden.shape[0]))


def _shift(a: jax.Array, d: int, fill: int) -> jax.Array:
  """a [..., T] moved d positions left along T, `fill` in the last d."""
  return jnp.concatenate([a[..., d:], jnp.full(a.shape[:-1] + (d,), fill, a.dtype)], axis=-1)


def _mtp(params, hidden: jax.Array, inputs: jax.Array, labels: jax.Array, packed: Any,
         rng: jax.Array, ce_sum, cfg: ModelConfig, lay: Layout, train: bool
         ) -> tuple[jax.Array, Any]:
  """Multi-token prediction (model.mtp_depth): the mean over depths d of the CE of token t+1+d
  at position t (labels -1 where t+d or t+1+d lies past the row or in another document), and
  the depths' blocks' stats [mtp_depth, ...]. hidden [M, B, T, D]: the last block's output."""
  m = inputs.shape[0]
  first = cfg.num_layers                                          # the depths' layer indices
  depth_block = layers.MtpDepth(cfg, train)
  side = (None, None) if packed is None else packed
  ce_sums, counts, all_stats, h = [], [], [], hidden
  for d in range(1, cfg.mtp_depth + 1):                           # a few depths: unrolled
    p = jax.tree.map(lambda a: a[d - 1], params['mtp'])
    labels_d = _shift(labels, d, -1)                              # [M, B, T]: token t+1+d
    if packed is not None:                                        # t and t+d in one document
      labels_d = jnp.where(_shift(packed[1], d, 0) == packed[1], labels_d, -1)
    emb = Embedder(cfg).apply({'params': params['embed']}, _shift(inputs, d, 0))

    def one(p_rng, xs, layer=first + d - 1):                      # [B, T, D], [B, T] each
      p, rng = p_rng
      h, emb, micro, (positions, segments) = xs
      y, stats = depth_block.apply({'params': p}, h, emb, positions, segments, layer,
                                   rngs={'dropout': rng_lib.dropout_block(rng, micro, layer)})
      return y, _layer_stats(stats)

    h, stats = pipeline_lib.each_micro_batch(one, (p, rng), (h, emb, jnp.arange(m), side),
                                             lay.pp)
    h = constrain(h, ('act_micro',) + layers.RESIDUAL)
    head = {'ln_f': p['ln_f'], 'w': params['head']['w']}
    ce_sums.append(ce_sum(head, h, labels_d))
    counts.append(jnp.sum(labels_d >= 0))
    all_stats.append(jax.tree.map(lambda a: jnp.sum(a, axis=0), stats))   # over micro-batches
  mean_ce = sum(c / jnp.maximum(n, 1) for c, n in zip(ce_sums, counts)) / cfg.mtp_depth
  return mean_ce, jax.tree.map(lambda *a: jnp.stack(a), *all_stats)


@functools.lru_cache(maxsize=8)
def cast_once(cfg: ModelConfig, lay: Layout) -> Any:
  """The block params the pipeline hands its stages in the compute dtype, cast once per step
  (a tree of dtype names, '' for as they are): the experts' matrices, most of a stage's bytes
  (cast at every tick, their reads and writes were a large part of a bf16 step on a GPU).
  None in float32."""
  if cfg.dtype == 'float32':
    return None
  expert_matrix = lambda s: 'experts' in tuple(s) and params_lib.role(tuple(s)) == 'matrix'
  return jax.tree.map(lambda s: cfg.dtype if expert_matrix(s) else '',
                      params_lib.param_axes(cfg, lay)['blocks'],
                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))


def hidden_states(params: dict[str, Any], inputs: jax.Array, rng: jax.Array, *,
                  cfg: ModelConfig, lay: Layout, train: bool, packed: Any = None
                  ) -> tuple[jax.Array, Any]:
  """Token ids [M, B, T] -> final hidden states [M, B, T, D] and per-layer stats [NB, ...].
  packed: None, or (positions, segments) [M, B, T] of packed documents (segment 0: padding)."""
  positions = None if packed is None else packed[0]
  with jax.named_scope('embed'):
    x = Embedder(cfg).apply({'params': params['embed']}, inputs, positions)  # [M, B, T, D]
  if cfg.dense_blocks:
    with jax.named_scope('dense_blocks'):
      x = _dense_blocks(params['dense_blocks'], x, cfg, lay, train, packed)
  hidden, stats = pipeline_lib.pipeline(
      _stage_fn(cfg, lay, train), params['blocks'], x, rng, stages=lay.pp,
      repeats=lay.repeats, remat_policy=lay.remat_policy, side=packed,
      cast_once=cast_once(cfg, lay), split_layers=lay.unroll_layers)
  return hidden, params_lib.from_stages(stats)


def next_token_logits(params: dict[str, Any], inputs: jax.Array, position: jax.Array, *,
                      cfg: ModelConfig, lay: Layout) -> jax.Array:
  """Logits [M, B, V] (float32, padded ids masked) of the token after `position` of inputs."""
  hidden, _ = hidden_states(params, inputs, jax.random.key(0), cfg=cfg, lay=lay, train=False)
  h = jax.lax.dynamic_index_in_dim(hidden, position, axis=2, keepdims=False)  # [M, B, D]
  return Head(cfg).apply({'params': params['head']}, h)


def unpack(batch: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
  """A batch [M, B, T+1] of token windows, or [M, B, 3, T+1] of packed rows (tokens, segment
  ids with 0 for padding, positions within each document) -> (inputs [M, B, T], labels
  [M, B, T], None or (positions, segments) [M, B, T]) with labels -1 where nothing is predicted
  (padding, and the last token of a document before the next one)."""
  if batch.ndim == 3:
    return batch[..., :-1], batch[..., 1:], None
  tokens, segments, positions = batch[:, :, 0], batch[:, :, 1], batch[:, :, 2]
  same = (segments[..., :-1] == segments[..., 1:]) & (segments[..., :-1] != 0)
  labels = jnp.where(same, tokens[..., 1:], -1)
  return tokens[..., :-1], labels, (positions[..., :-1], segments[..., :-1])


def loss_fn(params: dict[str, Any], tokens: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
            lay: Layout, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token CE + MoE aux losses over a batch: tokens [M, B, T+1] or packed rows
  [M, B, 3, T+1] (`unpack`); the CE averages over the predicted tokens (`targets`).

  Returns (loss, metrics) with per-block expert loads `expert_load` (kept), `expert_assigned`
  and `expert_preferred` [NB, E] ([NB + mtp_depth, E] with multi-token prediction: its blocks
  last, and its mean CE `mtp_ce`).
  """
  inputs, labels, packed = unpack(tokens)                              # [M, B, T]
  m, b, t = inputs.shape
  hidden, stats = hidden_states(params, inputs, rng, cfg=cfg, lay=lay, train=train,
                                packed=packed)
  ce_sum = lambda head, hidden, labels: _chunked_cross_entropy_sum(head, hidden, labels, cfg,
                                                                   lay)
  with jax.named_scope('head_loss'):
    targets = jnp.sum(labels >= 0)
    ce = ce_sum(params['head'], hidden, labels) / jnp.maximum(targets, 1)
  loss, mtp_metrics = ce, {}
  if cfg.mtp_depth:
    with jax.named_scope('mtp'):
      mtp_ce, mtp_stats = _mtp(params, hidden, inputs, labels, packed, rng, ce_sum, cfg, lay,
                                 train)
    stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stats, mtp_stats)
    loss, mtp_metrics = ce + cfg.mtp_loss_weight * mtp_ce, {'mtp_ce': mtp_ce}
  aux = cfg.aux_loss_weight * jnp.sum(stats['aux']) / m                # sum over blocks
  z = cfg.z_loss_weight * jnp.sum(stats['z']) / m
  kept, assigned = stats['kept'], stats['assigned']                     # [NB, E]
  metrics = {
      'ce': ce, 'aux_loss': aux, 'z_loss': z, 'targets': targets,
      'dropped_frac': 1.0 - jnp.sum(kept) / jnp.sum(assigned),
      'rerouted_frac': jnp.sum(stats['rerouted']) / jnp.sum(assigned),
      'expert_load': kept, 'expert_assigned': assigned, 'expert_preferred': stats['preferred'],
  }
  return loss + aux + z, dict(metrics, **mtp_metrics)
