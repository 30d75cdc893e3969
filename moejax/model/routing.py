"""Top-k routing with per-group capacity: which experts each token chooses, its place in their
queues and its gates (moving the tokens is moejax.model.dispatch's, the FFNs moejax.model.ffn's).

Legend: G routing groups, Q tokens per group (or part), D d_model, E experts, P top-k picks per
token, C capacity (rows per expert), X statistics per group.
Priority at capacity: every token's first choice before any second choice (GShard); within one
choice rank, earlier tokens first. Dropped assignments contribute zero (the residual carries them).
Nothing here scales as tokens x experts x capacity.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  expert: jax.Array  # [G, P, Q] int32 chosen expert
  slot: jax.Array    # [G, P, Q] int32 position in that expert's buffer (>= C when dropped)
  keep: jax.Array    # [G, P, Q] bool, within capacity
  gate: jax.Array    # [G, P, Q] float32 softmax probability of the chosen expert


class Scoring(NamedTuple):
  """How router logits become expert scores and choices: 'softmax' (probabilities over the
  experts) or 'sigmoid' (DeepSeek-V3: each expert's own sigmoid, chosen on sigmoid + selection
  bias); with groups > 1, a token chooses only within the top_groups expert groups whose two best
  selection scores sum highest (DeepSeek-V3's group-limited routing); gates times `scale`
  (routed_scaling_factor)."""
  score: str = 'softmax'
  groups: int = 1
  top_groups: int = 1
  scale: float = 1.0

  @classmethod
  def of(cls, cfg) -> Scoring:
    return cls(cfg.router_score, cfg.expert_groups, cfg.top_groups, cfg.routed_scale)


class GroupStats(NamedTuple):
  aux: jax.Array       # [G] Switch load-balancing loss E * sum_i f_i P_i (unweighted; f_i of
                       #     the preferred choices)
  z: jax.Array         # [G] router z-loss mean_s logsumexp(logits)^2 (unweighted)
  assigned: jax.Array  # [G, E] assignments per expert before capacity
  kept: jax.Array      # [G, E] assignments per expert within capacity
  preferred: jax.Array  # [G, E] assignments the scores alone would make (before in-group balancing)
  rerouted: jax.Array   # [G] assignments in-group balancing sent to an expert not preferred


def route(x: jax.Array, w_router: jax.Array, top_k: int, capacity: int,
          normalize_gates: bool | str = False, select_bias: jax.Array | None = None,
          valid: jax.Array | None = None, share=None,
          sinkhorn_iters: int = 0, router_bias: jax.Array | None = None,
          scoring: Scoring = Scoring()) -> tuple[Routing, GroupStats]:
  """Routes x [G, Q, D] with router weights [D, E] (and a bias [E] on the logits: GPT-OSS;
  softmax in float32).

  Gates are the chosen experts' softmax probabilities (Switch, GShard without renormalisation);
  with normalize_gates True or 'kept', a token's kept gates are divided by their sum
  (fairseq/NLLB top-2: renormalised after capacity, so a token with one kept choice weighs it
  1); with 'top_k', by the sum over all its top-k choices, before capacity (Mixtral, Qwen3-MoE
  and transformers' `norm_topk_prob`: a dropped choice keeps its share of the weight). The aux loss
  counts f_i over all K*S assignments, so it is 1 for uniform routing at any K; Mixtral's
  (counts over S) is K times it. select_bias [E] (aux-loss-free balancing) is added to the
  logits for choosing experts only (a prior multiplying the probabilities, so its scale does
  not depend on E); gates stay the chosen experts' unbiased probabilities.
  valid [G, Q] (packed rows): tokens outside it (padding) claim no slot, are not kept and count
  in none of the stats; the losses average over a group's valid tokens.

  sinkhorn_iters > 0 balances each group's choices (Sinkhorn, as Megatron's 'sinkhorn' router;
  for training): a per-group offset per expert, found so that softmax(scores + offset) gives
  every expert an equal share of the group's tokens, is added to the selection scores. Gates
  stay the unbiased probabilities; `preferred` counts the choices without the offset, and the
  aux loss's f_i counts those too (it trains the router's own preferences toward balance).

  share: None when each row of x is a whole routing group; else x's rows are parts of groups
  spread over devices, and share(part [G, X]) -> (group [G, X], earlier [G, X]) sums a float
  statistic over the parts of each row's group, and over the parts before it. The claims of
  earlier parts then come first in every expert's queue (so the same tokens drop as with the
  whole group on one device), and aux and z are the whole group's (every part reports them).
  """
  num_experts = w_router.shape[-1]
  logits, probs, scores, expert = choose(x, w_router, router_bias, select_bias, top_k, scoring)
  onehot = _choices(expert, num_experts, valid)                        # [G, P, Q, E]
  preferred = jnp.sum(onehot, axis=(1, 2))                             # [G, E]
  rerouted = jnp.zeros(onehot.shape[0], jnp.int32)                     # [G]
  if sinkhorn_iters > 0:
    offset = balancing_offset(scores, valid, sinkhorn_iters, share)    # [G, E]
    _, expert = jax.lax.top_k(scores + offset[:, None, :], top_k)      # [G, Q, P]
    wanted = jnp.sum(onehot, axis=1, keepdims=True)                    # [G, 1, Q, E] 0/1
    onehot = _choices(expert, num_experts, valid)
    rerouted = jnp.sum(onehot * (1 - wanted), axis=(1, 2, 3))          # [G]
  g, k, s, e = onehot.shape
  flat = onehot.reshape(g, k * s, e)                                   # [G, P*Q, E] k-major
  part = _statistics(onehot, preferred, probs, logits, valid)          # [G, P*E + 2E + 2]
  slot, whole = _slots(flat, part, share, k)                           # [G, P, Q], [G, X]
  keep = slot < capacity
  if valid is not None:
    keep = keep & valid[:, None, :]
  gate = gates(probs, expert, keep.transpose(0, 2, 1), normalize_gates,
               scoring.scale).transpose(0, 2, 1)                       # [G, P, Q]
  expert = expert.transpose(0, 2, 1)                                   # [G, P, Q]
  assigned = jnp.sum(flat, axis=1)                                     # [G, E] this part's
  kept = jnp.sum(flat * keep.reshape(g, k * s, 1), axis=1)             # [G, E]
  aux, z = _losses(whole, k, e)                                        # [G] each
  return (Routing(expert.astype(jnp.int32), slot.astype(jnp.int32), keep, gate),
          GroupStats(aux, z, assigned, kept, preferred, rerouted))


def choose(x: jax.Array, w_router: jax.Array, router_bias: jax.Array | None,
           select_bias: jax.Array | None, top_k: int, scoring: Scoring = Scoring()
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The router's prefix, shared by training and cached decoding: x [..., D] -> logits,
  expert scores (softmax probabilities or sigmoids; the gates are theirs), selection scores
  (logits, or sigmoids, + select_bias) [..., E] (float32) and the top-k experts [..., P] of the
  selection scores (within the best groups when scoring.groups > 1)."""
  logits = jnp.einsum('...D,DE->...E', x.astype(jnp.float32), w_router.astype(jnp.float32))
  if router_bias is not None:
    logits = logits + router_bias.astype(jnp.float32)
  if scoring.score == 'sigmoid':
    probs = jax.nn.sigmoid(logits)
    scores = probs
  else:
    probs = jax.nn.softmax(logits, axis=-1)
    scores = logits
  if select_bias is not None:
    scores = scores + select_bias.astype(jnp.float32)
  choice = scores if scoring.groups <= 1 else _within_top_groups(scores, scoring)
  _, expert = jax.lax.top_k(choice, top_k)
  return logits, probs, scores, expert


def _within_top_groups(scores: jax.Array, scoring: Scoring) -> jax.Array:
  """scores [..., E] with the experts outside each token's top_groups groups (of E/groups
  consecutive experts, ranked by the sum of their two best scores) set to -inf: never chosen."""
  e = scores.shape[-1]
  grouped = scores.reshape(scores.shape[:-1] + (scoring.groups, e // scoring.groups))
  best = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)                 # [..., groups]
  _, top = jax.lax.top_k(best, scoring.top_groups)                      # [..., top_groups]
  keep = jnp.sum(jax.nn.one_hot(top, scoring.groups, dtype=jnp.int32), axis=-2) > 0
  return jnp.where(keep[..., None], grouped, -jnp.inf).reshape(scores.shape)


def _losses(whole: jax.Array, k: int, e: int) -> tuple[jax.Array, jax.Array]:
  """The group's Switch aux loss E * sum_i f_i P_i and z-loss [G] from its statistics [G, X]
  (_statistics: f_i counts the preferred choices)."""
  count = jnp.maximum(whole[:, -2:-1], 1.0)                            # [G, 1] valid tokens
  frac = whole[:, k * e:k * e + e] / (k * count)                       # f_i [G, E]
  mean_prob = whole[:, k * e + e:k * e + 2 * e] / count                # P_i [G, E]
  return e * jnp.sum(frac * mean_prob, axis=-1), whole[:, -1] / count[:, 0]


def _slots(flat: jax.Array, part: jax.Array, share, k: int) -> tuple[jax.Array, jax.Array]:
  """Each assignment's place in its expert's queue [G, P, Q] (claims of earlier ranks, earlier
  tokens and, through `share`, earlier parts of the group come first) and the group's whole
  statistics [G, X] (this part's own when the part is the whole group). flat [G, P*Q, E]
  one-hot choices, k-major; part [G, X] this part's statistics (_statistics)."""
  g, ks, e = flat.shape
  s = ks // k
  position = jnp.cumsum(flat, axis=1) - flat                           # [G, P*Q, E] prior claims
  whole = part
  if share is not None:
    whole, earlier = share(part)
    claims = lambda a: a[:, :k * e].reshape(g, k, e)                   # [G, P, E] per rank
    others = claims(whole) - claims(part)                              # other parts, any order
    prefix = (jnp.cumsum(others, axis=1) - others) + claims(earlier)   # ranks < k; earlier k
    position = position + jnp.repeat(prefix.astype(position.dtype), s, axis=1)
  return jnp.sum(position * flat, axis=-1).reshape(g, k, s), whole


def gates(probs: jax.Array, expert: jax.Array, keep: jax.Array, normalize_gates: bool | str,
          scale: float) -> jax.Array:
  """The gates [..., P] of the chosen experts [..., P] (keep [..., P]: within capacity): their
  scores probs [..., E], renormalised per token (True or 'kept': over the kept ones, after
  capacity; 'top_k': over every choice, before capacity; False or 'none': not at all), times
  `scale`. Training's routing and cached decoding both take their gates from here."""
  gate = jnp.take_along_axis(probs, expert, axis=-1)                   # [..., P]
  over = 'kept' if normalize_gates is True else (normalize_gates or 'none')
  if over != 'none':
    norm_gate = gate if over == 'top_k' else jnp.where(keep, gate, 0.0)
    gate = norm_gate / jnp.maximum(jnp.sum(norm_gate, axis=-1, keepdims=True), 1e-9)
  return gate * scale


def _choices(expert: jax.Array, num_experts: int, valid: jax.Array | None) -> jax.Array:
  """One-hot choices [G, P, Q, E] of expert [G, Q, P]; invalid tokens choose nothing."""
  onehot = jax.nn.one_hot(expert.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
  if valid is not None:
    onehot = onehot * valid[:, None, :, None].astype(jnp.int32)
  return onehot


ANNEAL = 0.03   # the last Sinkhorn temperature, as a fraction of the score spread


def balancing_offset(scores: jax.Array, valid: jax.Array | None, iters: int,
                     share=None) -> jax.Array:
  """Per-group expert offsets [G, E] that balance the top choices of scores [G, Q, E] over a
  group's valid tokens: `iters` Sinkhorn iterations in log space (rows normalised by a softmax,
  columns scaled toward an equal share per expert) at a temperature annealed from the group's
  score spread to 3% of it, so the soft shares approach the hard choices' counts whatever the
  logits' scale. `share` as in route (sums over a group's parts)."""
  g, s, e = scores.shape
  scores = jax.lax.stop_gradient(scores)
  weight = jnp.ones((g, s), jnp.float32) if valid is None else valid.astype(jnp.float32)
  total = (lambda a: a) if share is None else (lambda a: share(a)[0])  # over the whole group
  centred = scores - jnp.mean(scores, axis=-1, keepdims=True)          # [G, Q, E]
  sums = total(jnp.stack([jnp.sum(weight, axis=-1),
                          jnp.einsum('GQE,GQ->G', centred ** 2, weight)], axis=-1))  # [G, 2]
  even = jnp.maximum(sums[:, :1], 1.0) / e                             # [G, 1] tokens/expert
  spread = jnp.sqrt(sums[:, 1:] / (even * e * e)) + 1e-6               # [G, 1] score std

  def step(i, offset):
    tau = spread * ANNEAL ** (i / max(iters - 1, 1))                   # [G, 1]
    p = jax.nn.softmax((scores + offset[:, None, :]) / tau[:, :, None], axis=-1)  # [G, Q, E]
    column = total(jnp.einsum('GQE,GQ->GE', p, weight))                # [G, E]
    return offset - tau * jnp.log(jnp.maximum(column, 1e-30) / even)
  return jax.lax.fori_loop(0, iters, step, jnp.zeros((g, e), jnp.float32))


def _statistics(onehot: jax.Array, preferred: jax.Array, probs: jax.Array, logits: jax.Array,
                valid: jax.Array | None) -> jax.Array:
  """Sums over a group's (valid) tokens [G, P*E + 2E + 2]: claims per rank and expert,
  preferred choices [G, E] per expert, router probabilities per expert, the token count, and
  the squared log-partition (z) sum."""
  g, k, s, e = onehot.shape
  weight = jnp.ones((g, s), jnp.float32) if valid is None else valid.astype(jnp.float32)
  lse2 = jax.nn.logsumexp(logits, axis=-1) ** 2                        # [G, Q]
  return jnp.concatenate([jnp.sum(onehot, axis=2).reshape(g, k * e).astype(jnp.float32),
                          preferred.astype(jnp.float32),
                          jnp.sum(probs * weight[..., None], axis=1),
                          jnp.sum(weight, axis=-1, keepdims=True),
                          jnp.sum(lse2 * weight, axis=-1, keepdims=True)], axis=-1)
