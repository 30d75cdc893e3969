"""How one shard's routed tokens reach their experts and come back: two dispatchers with one
interface, chosen in one place (`dispatcher`).

  rows, back = d.dispatch(tokens_, r)   # tokens_ [G_, Q, D] + routing -> rows at its experts
  y_ = d.combine(out, back)             # the experts' results for those rows -> [G_, Q, D], gated

Buffers (capacity dispatch, each routing group in one part): every expert gets C slots per part,
full or not, and the [E, G_*C, D] buffers move by all_to_all. Rows (dropless; capacity where a
group is split into parts): the part's assignments (dropless: all of them; capacity: the kept
ones) sorted by expert move as ragged rows and come back to be unsorted. Dropped assignments
contribute zero (the residual carries them).

Legend: G_ local parts (routing groups or pieces of one), Q tokens per group (or part), D d_model,
E experts (E_ = E/ep on a shard), C capacity (rows per expert), P top-k picks per token,
A_ assignments (G_*P*Q), ep expert shards. Names ending in `_` are
shard-local.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moejax.model import ffn as ffn_lib
from moejax.model import gather
from moejax.model.routing import Routing
from moejax.parallel import experts as ep_lib


def sends_rows(dispatch: str, parts_per_group: int) -> bool:
  """Whether the experts' tokens travel as ragged rows (dropless; capacity where a routing group
  is split into parts, each of which would carry the group's whole capacity: P x the expert
  matmuls) rather than in fixed [E, C] buffers (capacity, each group in one part)."""
  return dispatch == 'dropless' or parts_per_group > 1


def dispatcher(dispatch: str, parts_per_group: int, *, num_experts: int, local_experts: int,
               capacity: int, group_size: int, axes: tuple[str, ...],
               names: tuple[jax.Array, jax.Array] | None, compute_dtype: Any
               ) -> Buffers | Rows:
  """The dispatcher of an MoE layer on one shard. names: every source shard's part names
  (global group [ep, G_], first token's position in it [ep, G_]) that name the rows for their
  dropout masks; None without dropout."""
  if sends_rows(dispatch, parts_per_group):
    return Rows(num_experts, local_experts, capacity if dispatch == 'capacity' else 0,
                group_size, axes, names, compute_dtype)
  return Buffers(num_experts, capacity, axes, None if names is None else names[0],
                 compute_dtype)


@dataclasses.dataclass(frozen=True)
class Buffers:
  """Fixed [E, C] buffers per part; slots past C were dropped by routing."""
  num_experts: int
  capacity: int
  axes: tuple[str, ...]
  gid: jax.Array | None   # [ep, G_] every source's part groups (dropout row names), or None
  compute_dtype: Any

  def dispatch(self, tokens_: jax.Array, r: Routing) -> tuple[ffn_lib.ExpertRows, Routing]:
    """tokens_ [G_, Q, D] -> this shard's experts' buffers from every shard [E_, ep*G_*C, D]."""
    d = tokens_.shape[-1]
    buf_ = _pack(tokens_.astype(self.compute_dtype), r, self.num_experts, self.capacity)
    buf_ = buf_.reshape(self.num_experts, -1, d)                        # [E, G_*C, D]
    ids = None if self.gid is None else _buffer_row_ids(self.gid, self.num_experts,
                                                        self.capacity, self.axes)
    return ffn_lib.ExpertRows(ep_lib.to_experts(buf_, self.axes), ids=ids), r

  def combine(self, out: jax.Array, r: Routing) -> jax.Array:
    """The experts' results [E_, ep*G_*C, D] -> tokens [G_, Q, D], weighted by their gates."""
    g_, d = r.expert.shape[0], out.shape[-1]
    out_ = ep_lib.from_experts(out, self.axes)                          # [E, G_*C, D]
    return _unpack(out_.reshape(self.num_experts, g_, self.capacity, d), r)


@dataclasses.dataclass(frozen=True)
class Rows:
  """Assignments sorted by expert, sent as ragged rows to their expert's shard (grouped
  matmuls there), results unsorted home. capacity 0: dropless (every assignment)."""
  num_experts: int
  local_experts: int      # E_
  capacity: int
  group_size: int
  axes: tuple[str, ...]
  names: tuple[jax.Array, jax.Array] | None   # [ep, G_] x 2 (dropout row names), or None
  compute_dtype: Any

  def dispatch(self, tokens_: jax.Array, r: Routing) -> tuple[ffn_lib.ExpertRows, tuple]:
    """tokens_ [G_, Q, D] -> the rows this shard's experts received from every shard
    [ep*A_, D] with their local expert [ep*A_] (E_: padding past what arrived)."""
    g_, s, d = tokens_.shape
    k, e, local = r.expert.shape[1], self.num_experts, self.local_experts
    # [A_] (g, k, s) order; a dropped assignment gets expert E: sorted last and never sent
    expert = (jnp.where(r.keep, r.expert, e) if self.capacity else r.expert).reshape(-1)
    order = jnp.argsort(expert, stable=True)                            # by expert = by shard
    place = gather.inverse(order)                                       # [A_] its sorted row
    token = (jnp.arange(g_)[:, None, None] * s + jnp.arange(s)) * jnp.ones((1, k, 1), jnp.int32)
    by_token = place.reshape(g_, k, s).transpose(0, 2, 1).reshape(g_ * s, k)  # [G_*Q, P]
    rows_ = gather.take(tokens_.reshape(-1, d).astype(self.compute_dtype),
                        token.reshape(-1)[order][:, None], by_token)    # [A_, D] sorted
    send = jnp.bincount(expert // local, length=e // local)             # [ep] rows per shard
    keys = (expert[order] % local)[:, None]                             # [A_, 1] local expert
    if self.names is not None:   # a unit's mask follows its (token, choice) or slot
      keys = jnp.concatenate([keys, self._row_ids(r, s)[order][:, None]], axis=1)  # [A_, 2]
    got, got_keys, trip = ep_lib.ragged_to_experts(rows_, keys, send, self.axes, pad_key=local)
    ids = None if self.names is None else got_keys[:, 1]
    return ffn_lib.ExpertRows(got, got_keys[:, 0], ids), (trip, order, place, r)

  def combine(self, out: jax.Array, back: tuple) -> jax.Array:
    """The experts' results [ep*A_, D] -> tokens [G_, Q, D], weighted by their gates."""
    trip, order, place, r = back
    g_, k, s = r.expert.shape
    out_ = ep_lib.ragged_from_experts(out, trip, self.axes)             # [A_, D] sorted
    out_ = gather.take(out_, place[:, None], order[:, None])            # [A_, D] (g, k, s)
    weight = jnp.where(r.keep, r.gate, 0.0).astype(out_.dtype)          # [G_, P, Q]
    return jnp.einsum('GPQD,GPQ->GQD', out_.reshape(g_, k, s, -1), weight)  # [G_, Q, D]

  def _row_ids(self, r: Routing, s: int) -> jax.Array:
    """This shard's assignments' names [A_] in (g, k, s) order: at capacity the slot each took
    (as Buffers names it: dropped ones get names never used), else the (token, choice)."""
    me = jax.lax.axis_index(self.axes)
    gid_, start_ = self.names[0][me], self.names[1][me]                 # [G_] each
    if self.capacity:
      ids = (gid_[:, None, None] * self.num_experts + r.expert) * self.capacity + r.slot
      return jnp.where(r.keep, ids, -1).reshape(-1)                     # [G_, P, Q] -> [A_]
    k = r.expert.shape[1]
    at = start_[:, None, None] + jnp.arange(s)                          # [G_, 1, Q]
    return ((gid_[:, None, None] * k + jnp.arange(k)[:, None]) * self.group_size
            + at).reshape(-1)                                           # [A_]


def _buffer_row_ids(gid: jax.Array, num_experts: int, capacity: int,
                    axes: tuple[str, ...]) -> jax.Array:
  """Mesh-independent name of every row of the dispatched buffer [E_, ep*G_*C]:
  (global group * E + global expert) * C + slot; gid [ep, G_] every source's part groups."""
  ep = gid.shape[0]
  local = num_experts // ep
  expert = jax.lax.axis_index(axes) * local + jnp.arange(local)         # [E_] global ids
  ids = ((gid[None, :, :, None] * num_experts + expert[:, None, None, None]) * capacity
         + jnp.arange(capacity))                                        # [E_, ep, G_, C]
  return ids.reshape(local, -1)                                         # [E_, ep*G_*C]


def _slots(r: Routing, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(each assignment's slot [A] in the buffers [E, G, C] flattened, E*G*C where dropped;
  each slot's assignment [E*G*C] in [G, P, Q] flattened, A where empty)."""
  g, k, s = r.expert.shape
  groups = jnp.arange(g)[:, None, None]                                 # [G, 1, 1]
  size = num_experts * g * capacity
  slot = jnp.where(r.keep, (r.expert * g + groups) * capacity + r.slot, size).reshape(-1)
  owner = jnp.full((size,), slot.shape[0], jnp.int32).at[slot].set(
      jnp.arange(slot.shape[0], dtype=jnp.int32), mode='drop')
  return slot, owner


def _pack(x: jax.Array, r: Routing, num_experts: int, capacity: int) -> jax.Array:
  """Tokens x [G, Q, D] into expert buffers [E, G, C, D]; empty slots are zero."""
  g, s, d = x.shape
  k = r.expert.shape[1]
  slot, owner = _slots(r, num_experts, capacity)                        # [A], [E*G*C]
  token = jnp.where(owner < slot.shape[0], owner // (k * s) * s + owner % s, g * s)
  by_token = slot.reshape(g, k, s).transpose(0, 2, 1).reshape(g * s, k)  # [G*Q, P]
  buf = gather.take(x.reshape(g * s, d), token[:, None], by_token)     # [E*G*C, D]
  return buf.reshape(num_experts, g, capacity, d)


def _unpack(y: jax.Array, r: Routing) -> jax.Array:
  """Expert outputs y [E, G, C, D] back to tokens [G, Q, D], weighted by their gates."""
  e, g, c, d = y.shape
  slot, owner = _slots(r, e, c)                                         # [A], [E*G*C]
  out = gather.take(y.reshape(-1, d), slot[:, None], owner[:, None])   # [A, D]
  out = out.reshape(r.expert.shape + (d,))                              # [G, P, Q, D]
  weight = jnp.where(r.keep, r.gate, 0.0).astype(y.dtype)               # [G, P, Q]
  return jnp.einsum('GPQD,GPQ->GQD', out, weight)
