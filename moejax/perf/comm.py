"""The analytic minimum of collective traffic for a layout.

Bytes are counted like `moejax.perf.hlo`: the result size of each collective, per device,
per train step, so the two can be compared directly. The minimum assumes no recomputation (a
rematerialised forward repeats its tensor-parallel collectives and all-to-alls) and no bubble
ticks (idle stages compute on nothing), and counts only what the layout requires. A device
holds b / dp sequences of each micro-batch, each split over tp:
  tp: sequence-parallel attention (all-gather in, reduce-scatter out; the reverse in backward);
      vocab-parallel embedding and head (reduce-scatter / all-gather of [B, T, D]) and the
      softmax statistics;
  experts (over tp, or dp x tp when folded): dispatch + return, forward and backward. Capacity
      with each routing group in one part: every part a device holds carries E*C rows;
      dropless, or capacity with groups split into parts (moe.group_parts): the K rows of each
      of the device's tokens, in ragged all-to-alls (at capacity the kept ones: at most K);
  pp: one activation permute per tick and direction; micro-batches to the first stage and
      outputs from the last stage;
  gradients: one all-reduce of each weight's shard that is replicated over devices that see
      other tokens (every mesh axis splits tokens: dp the batch, tp the sequence, pp the
      micro-batches), read from the weights' shardings.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from moejax.config import Layout, ModelConfig
from moejax.model.dispatch import sends_rows
from moejax.model.moe import group_parts
from moejax.parallel import mesh as mesh_lib


def minimum_bytes(cfg: ModelConfig, lay: Layout, gradient_bytes: int
                  ) -> dict[str, dict[str, int]]:
  """{term: {collective kind: bytes}} per device per step; `gradient_bytes`: the per-device
  bytes of weight gradients that need an all-reduce (replicated_gradient_bytes)."""
  dt = jnp.dtype(cfg.dtype).itemsize
  tp, pp, m, t, d = lay.tp, lay.pp, lay.num_micro_batches, lay.seq_len, cfg.d_model
  b = lay.micro_batch_size // lay.dp           # sequences of a micro-batch on one device row
  btd = b * t * d                              # one micro-batch of activations, all of T
  local_blocks = cfg.num_blocks // pp          # blocks per device (all repeats)
  local_micro = m // pp                        # micro-batches embedded / scored per device
  ep = lay.expert_shards
  terms: dict[str, dict[str, int]] = {}
  if tp > 1:
    per = local_blocks * m
    terms['attention (tp)'] = {'all-gather': per * 2 * btd * dt,
                               'reduce-scatter': per * 2 * btd // tp * dt}
    terms['embedding (tp)'] = {'reduce-scatter': local_micro * btd // tp * dt,
                               'all-gather': local_micro * btd * dt}
    terms['head + softmax (tp)'] = {'all-gather': local_micro * btd * dt,
                                    'reduce-scatter': local_micro * btd // tp * dt,
                                    'all-reduce': local_micro * 3 * b * t * 4}
  if ep > 1:
    terms[f'experts ({"dp x tp" if ep > tp else "tp"} all-to-all)'] = {
        kind: local_blocks * m * 4 * rows * d * dt for kind, rows in _expert_rows(cfg, lay).items()}
  if pp > 1:
    ticks = lay.repeats * m + pp - 1
    terms['pipeline shift (pp)'] = {'collective-permute': 2 * ticks * btd // tp * dt}
    terms['pipeline in/out (pp)'] = {
        'collective-permute': 4 * (pp - 1) * local_micro * btd // tp * dt}
  if gradient_bytes:
    terms['gradient all-reduce'] = {'all-reduce': gradient_bytes}
  return terms


def _expert_rows(cfg: ModelConfig, lay: Layout) -> dict[str, int]:
  """{exchange kind: rows} one device sends per MoE layer, micro-batch and direction."""
  (rows, groups, _), split = group_parts(lay.micro_batch_size, lay.seq_len, cfg.group_size,
                                         lay.tp, lay.dp)
  if sends_rows(cfg.dispatch, split.parts):
    tokens = lay.micro_batch_size // lay.dp * lay.seq_len // lay.tp
    return {'ragged-all-to-all': tokens * cfg.top_k}
  parts = rows // lay.dp * groups // lay.tp   # [B'/dp, nG/tp] parts on a device
  return {'all-to-all': parts * cfg.num_experts * cfg.capacity(True)}


def replicated_gradient_bytes(params, mesh_shape: dict[str, int]) -> int:
  """Per-device bytes of the weights (abstract arrays with shardings) whose shard is held by
  several devices: their gradients are summed over those devices."""
  import jax
  total = 0
  for leaf in jax.tree.leaves(params):
    split = {a for entry in leaf.sharding.spec for a in mesh_lib.axes_of(entry)}
    if any(n > 1 and a not in split for a, n in mesh_shape.items()):
      total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  return total


def totals(terms: dict[str, dict[str, int]]) -> dict[str, int]:
  """Sum of `minimum_bytes` terms by collective kind."""
  out: dict[str, int] = {}
  for by_kind in terms.values():
    for kind, n in by_kind.items():
      out[kind] = out.get(kind, 0) + n
  return out
