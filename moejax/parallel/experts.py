"""Expert parallelism, independent of what the experts compute: the exchanges that take rows to
the shards of their experts and the results back (all_to_all of fixed-size buffers, or ragged
rows with per-peer sizes), and the shard_map that runs a function of one shard's tokens and
experts over the mesh axes the experts are split over (tp, or dp x tp when folded).

The MoE maths (routing, which rows go where, the expert FFN) is moejax.model's (moe.py,
dispatch.py); moe hands this module a shard-local function. Names ending in `_` are shard-local.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.parallel import mesh as mesh_lib, remat


def expert_axes() -> tuple[str, ...]:
  """Mesh axes the experts are split over, under the active rules."""
  return mesh_lib.axes_of(mesh_lib.spec(('experts',))[0])


def to_experts(buf_: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """Rows for every expert buf_ [E, Y_, D] -> each shard's experts get theirs from every shard,
  by source [E/ep, ep*Y_, D]."""
  with jax.named_scope('moe_all_to_all_dispatch'):
    buf_ = jax.lax.all_to_all(buf_, axes, 0, 1, tiled=True)           # [E/ep, ep*Y_, D]
  return checkpoint_name(buf_, remat.MOE_DISPATCHED)


def from_experts(out_: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """to_experts' inverse: the experts' results [E/ep, ep*Y_, D] go home [E, Y_, D]."""
  with jax.named_scope('moe_all_to_all_combine'):
    out_ = jax.lax.all_to_all(out_, axes, 1, 0, tiled=True)           # [E, Y_, D]
  return checkpoint_name(out_, remat.MOE_RETURNED)


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                             recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's result (one slice per peer) from a dense all_to_all of
  [ep, N, ...] blocks: every peer's slice padded to the whole operand (N rows)."""
  n = operand.shape[0]
  i = jnp.arange(n)
  idx = jnp.clip(input_offsets[:, None] + i, 0, n - 1)                  # [ep, N]
  sent = (i < send_sizes[:, None]).reshape((-1, n) + (1,) * (operand.ndim - 1))
  blocks = jnp.where(sent, operand[idx], 0)                              # [ep, N, ...]
  blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)       # [ep sources, N, ...]
  start = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [ep] where each goes
  dst = jnp.where(i < recv_sizes[:, None], start[:, None] + i, output.shape[0])  # [ep, N]
  return output.at[dst].set(blocks, mode='drop')


def _exclusive_cumsum(a: jax.Array) -> jax.Array:
  return jnp.cumsum(a) - a


class RaggedTrip(NamedTuple):
  """Where ragged_to_experts sent a shard's rows [ep] (offsets and sizes), to bring them home."""
  send_off: jax.Array    # where each destination's rows start in the sender's rows_
  send_sizes: jax.Array  # rows sent to each destination
  recv_off: jax.Array    # where each source's rows start in the receiver's buffer
  recv_sizes: jax.Array  # rows received from each source
  home_off: jax.Array    # where the results for each source start in its rows_


def ragged_to_experts(rows_: jax.Array, keys_: jax.Array, send_sizes: jax.Array,
                      axes: tuple[str, ...], pad_key: int
                      ) -> tuple[jax.Array, jax.Array, RaggedTrip]:
  """Rows grouped by destination shard rows_ [N_, D] (send_sizes [ep] of them for each shard, in
  shard order) with int keys_ [N_, ...] -> each shard receives its rows from every shard, by
  source, in a worst-case buffer [ep*N_, D] with their keys (pad_key past what arrived), and the
  trip that ragged_from_experts reverses.

  Per-peer sizes are exchanged first (an all_to_all of [ep] counts); the rows then move by
  jax.lax.ragged_all_to_all, or by padded_ragged_all_to_all where the backend lacks it. A group
  of one shard moves nothing (no collective kernel).
  """
  n, ep = rows_.shape[0], send_sizes.shape[0]
  send_off = _exclusive_cumsum(send_sizes)                              # [ep] in my rows_
  if ep == 1:
    sent = _first(n, send_sizes[0])
    trip = RaggedTrip(send_off, send_sizes, send_off, send_sizes, send_off)
    return (checkpoint_name(jnp.where(sent(rows_.ndim), rows_, 0), remat.MOE_DISPATCHED),
            jnp.where(sent(keys_.ndim), keys_, pad_key), trip)
  recv_sizes = jax.lax.all_to_all(send_sizes, axes, 0, 0, tiled=True)   # [ep] from each source
  recv_off = _exclusive_cumsum(recv_sizes)                              # [ep] in my buffer
  dest_off = jax.lax.all_to_all(recv_off, axes, 0, 0, tiled=True)       # [ep] mine, on each peer
  home_off = jax.lax.all_to_all(send_off, axes, 0, 0, tiled=True)       # [ep] theirs, at home
  go = lambda a, out: _ragged()(a, out, send_off, send_sizes, dest_off, recv_sizes,
                                axis_name=axes)
  with jax.named_scope('moe_ragged_dispatch'):
    got = go(rows_, jnp.zeros((ep * n,) + rows_.shape[1:], rows_.dtype))  # [ep*N_, D]
    got_keys = go(keys_, jnp.full((ep * n,) + keys_.shape[1:], pad_key, keys_.dtype))
  trip = RaggedTrip(send_off, send_sizes, recv_off, recv_sizes, home_off)
  return checkpoint_name(got, remat.MOE_DISPATCHED), got_keys, trip


def ragged_from_experts(out: jax.Array, trip: RaggedTrip, axes: tuple[str, ...]) -> jax.Array:
  """ragged_to_experts' inverse: results for the received rows [ep*N_, D'] back to their
  senders, in rows_'s order [N_, D'] (0 past the rows sent)."""
  ep = trip.send_sizes.shape[0]
  n = out.shape[0] // ep
  if ep == 1:
    back = jnp.where(_first(n, trip.send_sizes[0])(out.ndim), out, 0)
  else:
    with jax.named_scope('moe_ragged_combine'):
      back = _ragged()(out, jnp.zeros((n,) + out.shape[1:], out.dtype), trip.recv_off,
                       trip.recv_sizes, trip.home_off, trip.send_sizes, axis_name=axes)
  return checkpoint_name(back, remat.MOE_RETURNED)                      # [N_, D']


def _ragged():
  return (jax.lax.ragged_all_to_all if kernels.exchange(mesh_lib.platform()) == 'ragged'
          else padded_ragged_all_to_all)


def _first(n: int, count: jax.Array):
  """ndim -> a mask of the first `count` of n rows, shaped to broadcast over ndim dims."""
  sent = jnp.arange(n) < count                                          # [n]
  return lambda ndim: sent.reshape((n,) + (1,) * (ndim - 1))


def source_offsets(spec: P, local_shape: Sequence[int], axes: tuple[str, ...]
                   ) -> list[tuple[jax.Array, int]]:
  """For each dimension of a shard-local array laid out as `spec`: the offset of every source
  shard's block (in all_to_all order over `axes`) [ep], and the dimension's global size. The
  sources share this shard's coordinates on the spec's other (manual) axes. Arithmetic on axis
  sizes and indices only (no collective)."""
  sizes = [jax.lax.axis_size(a) for a in axes]
  src = jnp.arange(math.prod(sizes))
  coord = {a: (src // math.prod(sizes[i + 1:])) % sizes[i] for i, a in enumerate(axes)}
  out = []
  for entry, local in zip(tuple(spec) + (None,) * len(local_shape), local_shape):
    index, count = jnp.zeros_like(src), 1
    for a in mesh_lib.axes_of(entry):
      size = jax.lax.axis_size(a)
      here = coord[a] if a in coord else jax.lax.axis_index(a)
      index, count = index * size + here, count * size
    out.append((index * local, count * local))
  return out


def manual_axes(token_spec: P, axes: tuple[str, ...]) -> tuple[str, ...]:
  """The manual axes of expert_parallel, in mesh order: the expert axes and every axis the
  tokens are split over."""
  split = set(axes) | {a for entry in token_spec for a in mesh_lib.axes_of(entry)}
  return tuple(a for a in mesh_lib.AXES if a in split)


def expert_parallel(fn: Callable[..., Any], weights: Any, weight_axes: Any, tokens: Any,
                    token_axes: Sequence[str | None], rng: jax.Array) -> Any:
  """fn(weights_, tokens_, rng, axes=, token_spec=) on every shard, manual over the expert axes
  `axes` and the axes the tokens are split over (dp when the experts are not folded over it:
  each dp row exchanges only its own tokens, over `axes`).

  weights: a tree with logical axes `weight_axes` (same structure); tokens: an array or a tree
  of arrays whose leading axes are laid out as `token_axes`. Every output of fn has the tokens'
  leading layout. Mesh axes that split neither stay automatic.
  """
  axes = expert_axes()
  split = manual_axes(mesh_lib.spec(token_axes), axes)
  manual = lambda p: mesh_lib.restrict(p, split)
  is_axes = lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a)
  w_specs = jax.tree.map(lambda a: manual(mesh_lib.spec(a)), weight_axes, is_leaf=is_axes)
  t_spec = manual(mesh_lib.spec(token_axes))
  local = lambda w_, t_, k: fn(w_, t_, k, axes=axes, token_spec=t_spec)
  token_specs = jax.tree.map(lambda _: t_spec, tokens)
  return jax.shard_map(local, in_specs=(w_specs, token_specs, P()), out_specs=t_spec,
                       axis_names=set(split), check_vma=False)(weights, tokens, rng)
