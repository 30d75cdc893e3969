"""The analytic minimum of collective traffic for a layout (DESIGN.md section 3).

Bytes are counted like `moejax.perf.hlo`: the result size of each collective, per device,
per train step, so the two can be compared directly. The minimum assumes no recomputation (a
rematerialised forward repeats its tensor-parallel collectives and all-to-alls) and counts only
what the layout requires:
  tp: sequence-parallel attention (all-gather in, reduce-scatter out; the reverse in backward);
      expert all-to-alls (dispatch + return, forward and backward: E*C capacity rows per group,
      or with dropless dispatch the K rows of every token, in ragged all-to-alls);
      vocab-parallel embedding and head (reduce-scatter / all-gather of [B, T, D]) and the
      softmax statistics;
  pp: one activation permute per tick and direction; micro-batches to the first stage and
      outputs from the last stage;
  gradients of weights replicated over devices that see different tokens (all-reduce).
"""
from __future__ import annotations

import jax.numpy as jnp

from moejax.config import Layout, ModelConfig


def minimum_bytes(cfg: ModelConfig, lay: Layout) -> dict[str, dict[str, int]]:
  """{term: {collective kind: bytes}} per device per step."""
  dt = jnp.dtype(cfg.dtype).itemsize
  tp, pp, m, b, t, d = lay.tp, lay.pp, lay.num_micro_batches, lay.micro_batch_size, lay.seq_len, \
      cfg.d_model
  btd = b * t * d                              # one micro-batch of activations, all of T
  local_blocks = cfg.num_blocks // pp          # blocks per device (all repeats)
  local_micro = m // pp                        # micro-batches embedded / scored per device
  terms: dict[str, dict[str, int]] = {}
  if tp > 1:
    per = local_blocks * m
    terms['attention (tp)'] = {'all-gather': per * 2 * btd * dt,
                               'reduce-scatter': per * 2 * btd // tp * dt}
    if cfg.dispatch == 'dropless':
      a2a, kind = b * t // tp * cfg.top_k * d * dt, 'ragged-all-to-all'
    else:
      groups = b * t // tp // cfg.group_size
      a2a, kind = groups * cfg.num_experts * cfg.capacity(True) * d * dt, 'all-to-all'
    terms['experts (tp all-to-all)'] = {kind: per * 4 * a2a}
    terms['embedding (tp)'] = {'reduce-scatter': local_micro * btd // tp * dt,
                               'all-gather': local_micro * btd * dt}
    terms['head + softmax (tp)'] = {'all-gather': local_micro * btd * dt,
                                    'reduce-scatter': local_micro * btd // tp * dt,
                                    'all-reduce': local_micro * 3 * b * t * 4}
  if pp > 1:
    ticks = lay.repeats * m + pp - 1
    terms['pipeline shift (pp)'] = {'collective-permute': 2 * ticks * btd // tp * dt}
    terms['pipeline in/out (pp)'] = {
        'collective-permute': 4 * (pp - 1) * local_micro * btd // tp * dt}
  # Weights every device of a group holds whole while the group's devices see other tokens.
  f32 = 4
  grads = 0
  table = cfg.max_len * d if cfg.positions == 'learned' else 0   # the position table
  if pp > 1:   # embedding and head are replicated over pp (each stage scores M/pp micro-batches)
    grads += (2 * cfg.padded_vocab // tp * d + table + 2 * d) * f32
  if tp > 1 and not pp > 1:
    grads += (table + 2 * d) * f32
  if tp > 1:   # layer norms and router are replicated over tp, tokens are split over it
    grads += local_blocks * (4 * d + d * cfg.num_experts) * f32
  if grads:
    terms['gradient all-reduce'] = {'all-reduce': grads}
  return terms


def totals(terms: dict[str, dict[str, int]]) -> dict[str, int]:
  """Sum of `minimum_bytes` terms by collective kind."""
  out: dict[str, int] = {}
  for by_kind in terms.values():
    for kind, n in by_kind.items():
      out[kind] = out.get(kind, 0) + n
  return out
