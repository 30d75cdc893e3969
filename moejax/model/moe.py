"""The Mixture-of-Experts layer: route, dispatch, expert FFN, combine, on each shard of the
expert-parallel axes. Two dispatches: 'capacity' (overflow dropped; the seed's) and 'dropless'
(nothing dropped); moejax.model.dispatch moves the tokens to their experts and back (fixed
[E, C] buffers where a routing group is one part, else ragged rows).

Legend: B batch, T sequence, D d_model, Q tokens per group (or part), G_ local parts (routing
groups or pieces of one), E experts, C capacity (rows per expert), F expert hidden, P top-k
picks per token, A_ assignments (G_*P*Q). The tokens are routed in parts [B', nG, Q] (B' rows of
nG parts of Q tokens; a part is a routing group or one shard's piece of one). Names ending in `_`
are shard-local.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.model import dispatch as dispatch_lib, ffn as ffn_lib, routing
from moejax.parallel import experts as ep_lib, mesh as mesh_lib


class ExpertWeights(NamedTuple):
  router: jax.Array  # [D, E]
  w1: jax.Array      # [E, D, F] (SwiGLU: the gate projection)
  b1: jax.Array | None  # [E, F] (None: experts without biases)
  w2: jax.Array      # [E, F, D]
  b2: jax.Array | None  # [E, D]
  select_bias: jax.Array | None = None  # [E] aux-loss-free balancing (not trained by gradient)
  w3: jax.Array | None = None  # [E, D, F] SwiGLU's up projection (None: GELU MLP)
  b3: jax.Array | None = None  # [E, F]
  router_bias: jax.Array | None = None  # [E] added to the router's logits (GPT-OSS)

  def ffn(self, dtype) -> ffn_lib.FFNWeights:
    """The expert FFN's weights in the compute dtype."""
    return ffn_lib.FFNWeights(self.w1, self.b1, self.w2, self.b2, self.w3, self.b3).cast(dtype)


WEIGHT_AXES = ExpertWeights(
    router=('embed', None), w1=('experts', 'embed', 'mlp'), b1=('experts', 'mlp'),
    w2=('experts', 'mlp', 'embed'), b2=('experts', 'embed'), select_bias=(None,),
    w3=('experts', 'embed', 'mlp'), b3=('experts', 'mlp'), router_bias=(None,))
GROUP_AXES = ('act_batch', 'act_groups')  # leading axes of [B', nG, Q, D] token parts


@dataclasses.dataclass(frozen=True)
class MoESettings:
  """How one MoE layer routes and computes (everything but its weights and tokens)."""
  group_size: int                 # tokens per routing group (moe() docstring)
  top_k: int
  capacity: int = 0               # slots per expert per group ('capacity' dispatch only)
  dispatch: str = 'capacity'      # 'capacity' (drop past the slots) or 'dropless'
  dropout_rate: float = 0.0       # on expert hidden units
  compute_dtype: Any = jnp.float32
  act: ffn_lib.Activation = ffn_lib.Activation()   # the experts' activation
  normalize_gates: bool | str = False   # False, True / 'kept' or 'top_k' (routing.route)
  sinkhorn_iters: int = 0         # > 0: in-group balancing (training)
  scoring: routing.Scoring = routing.Scoring()   # expert scores, groups, gate scale

  @classmethod
  def of(cls, cfg, train: bool) -> MoESettings:
    """The settings of a ModelConfig's MoE layers, in training or evaluation."""
    return cls(group_size=cfg.group_size, top_k=cfg.top_k, capacity=cfg.capacity(train),
               dispatch=cfg.dispatch, dropout_rate=cfg.expert_dropout if train else 0.0,
               compute_dtype=jnp.dtype(cfg.dtype), act=ffn_lib.Activation.of(cfg),
               normalize_gates=cfg.gate_norm, sinkhorn_iters=cfg.sinkhorn_iters if train else 0,
               scoring=routing.Scoring.of(cfg))

  @property
  def route_capacity(self) -> int:
    """Slots routing allots: the capacity, or room for every choice when dropless."""
    return self.capacity if self.dispatch == 'capacity' else self.top_k * self.group_size


class Groups(NamedTuple):
  """Where routing groups sit in the MoE's token parts [B', nG, Q] (moe() lays x [B, T, D] out
  so): a group is `rows` consecutive rows of `span` consecutive parts each."""
  rows: int
  span: int

  @property
  def parts(self) -> int:
    return self.rows * self.span


def _part_names(b_: int, ng_: int, s: int, groups: Groups, axes: tuple[str, ...],
                group_spec: P) -> tuple[jax.Array, jax.Array]:
  """Mesh-independent names of every shard's local parts [P, G_] (all_to_all order over
  `axes`, G_ = b_*ng_): the global routing group of the micro-batch each part belongs to, and
  the position of its first token in that group (groups are ordered sequence-major)."""
  (b0, _), (g0, ng) = ep_lib.source_offsets(group_spec, (b_, ng_), axes)
  row = b0[:, None, None] + jnp.arange(b_)[None, :, None]              # [P, B_, 1]
  part = g0[:, None, None] + jnp.arange(ng_)[None, None, :]            # [P, 1, nG_]
  gid = (row // groups.rows) * (ng // groups.span) + part // groups.span  # [P, B_, nG_]
  start = ((row % groups.rows) * groups.span + part % groups.span) * s  # [P, B_, nG_]
  return gid.reshape(b0.shape[0], -1), start.reshape(b0.shape[0], -1)


def _group_share(gid: jax.Array, start: jax.Array, axes: tuple[str, ...]):
  """routing.route's `share` for groups made of several parts (here or on other shards): a
  small all-gather of every part's statistics [G_, X], summed over each local part's group,
  and over the group's parts before it. gid, start [P, G_]: every shard's part names."""
  me = jax.lax.axis_index(axes)
  same = gid[:, :, None] == gid[me][None, None, :]                      # [P, G_, G_] (p, j) ~ i
  earlier = same & (start[:, :, None] < start[me][None, None, :])

  def share(part: jax.Array) -> tuple[jax.Array, jax.Array]:
    every = jax.lax.all_gather(part, axes)                              # [P, G_, X]
    pick = lambda mask: jnp.einsum('PJI,PJX->IX', mask.astype(part.dtype), every)
    return pick(same), pick(earlier)
  return share


def _moe_local(w_: ExpertWeights, inputs_: tuple, rng: jax.Array, *, axes: tuple[str, ...],
               token_spec: P, groups: Groups, settings: MoESettings
               ) -> tuple[jax.Array, routing.GroupStats]:
  """Shard-local MoE: (x_ [B_, nG_, Q, D], valid_ [B_, nG_, Q] or None) -> ([B_, nG_, Q, D],
  per-part stats); `groups` says which parts make one routing group."""
  x_, valid_ = inputs_
  b_, ng_, s, d = x_.shape
  tokens_ = x_.reshape(b_ * ng_, s, d)                                  # [G_, Q, D]
  valid_ = None if valid_ is None else valid_.reshape(b_ * ng_, s)     # [G_, Q]
  names = _part_names(b_, ng_, s, groups, axes, token_spec)             # [ep, G_] x 2
  share = None
  if groups.parts > 1:   # a group's parts may lie on any shard the tokens are split over
    every = ep_lib.manual_axes(token_spec, axes)
    share = _group_share(*_part_names(b_, ng_, s, groups, every, token_spec), every)
  r, stats = routing.route(tokens_, w_.router, settings.top_k, settings.route_capacity,
                           settings.normalize_gates, w_.select_bias, valid_, share,
                           settings.sinkhorn_iters, w_.router_bias, settings.scoring)
  d_ = dispatch_lib.dispatcher(
      settings.dispatch, groups.parts, num_experts=w_.router.shape[-1],
      local_experts=w_.w1.shape[0], capacity=settings.capacity, group_size=settings.group_size,
      axes=axes, names=names if settings.dropout_rate > 0.0 else None,
      compute_dtype=settings.compute_dtype)
  rows, back = d_.dispatch(tokens_, r)                                  # at this shard's experts
  out = ffn_lib.experts(rows, w_.ffn(settings.compute_dtype), act=settings.act,
                        dropout_rate=settings.dropout_rate, rng=rng)
  y_ = d_.combine(out, back)                                            # [G_, Q, D]
  stats = jax.tree.map(lambda a: a.reshape((b_, ng_) + a.shape[1:]), stats)
  return y_.reshape(b_, ng_, s, d), stats


def moe(weights: ExpertWeights, x: jax.Array, rng: jax.Array, settings: MoESettings,
        valid: jax.Array | None = None) -> tuple[jax.Array, routing.GroupStats]:
  """Expert-parallel MoE. x: [B, T, D] (sequence split over tp). Returns y [B, T, D] and
  per-part stats (leading axes [B', nG]; aux and z are the whole group's in every part, the
  loads the part's own).

  A routing group is settings.group_size consecutive tokens of a sequence (dividing T), or
  group_size / T whole consecutive sequences (a multiple of T): a micro-batch's groups are the
  same on every mesh. Where one group lies on several shards (or in several parts of this one),
  its parts share their claim counts, so the same tokens are kept as on one device.

  dispatch 'capacity': each expert takes `capacity` tokens per group, the rest are dropped;
  'dropless': every assignment is computed. valid [B, T]: tokens of packed rows that are not
  padding (padding takes no capacity and is not in the stats). sinkhorn_iters > 0: each group's
  choices are balanced in-group (routing.route).
  """
  b, t, d = x.shape
  shape, groups = _layout(b, t, settings.group_size)                    # [B', nG, Q]
  parts = mesh_lib.constrain(x.reshape(shape + (d,)), GROUP_AXES + (None, 'act_embed'))
  fn = functools.partial(_moe_local, groups=groups, settings=settings)
  axes = WEIGHT_AXES._replace(**{name: None for name, w in weights._asdict().items() if w is None})
  if valid is not None:
    valid = mesh_lib.constrain(valid.reshape(shape), GROUP_AXES + (None,))
  y, stats = ep_lib.expert_parallel(fn, weights, axes, (parts, valid), GROUP_AXES, rng)
  return y.reshape(b, t, d), stats                                      # -> [B, T, D]


def _layout(b: int, t: int, group_size: int) -> tuple[tuple[int, int, int], Groups]:
  """group_parts under the active mesh."""
  return group_parts(b, t, group_size, _shards('act_groups'), _shards('act_batch'))


def group_parts(b: int, t: int, group_size: int, seq_shards: int = 1, batch_shards: int = 1
                ) -> tuple[tuple[int, int, int], Groups]:
  """The parts [B', nG, Q] x [B, T] is cut into for routing, and how they make groups, when
  a sequence is split over `seq_shards` devices and the batch over `batch_shards`. A part is
  one shard's piece of a group: a whole group where a shard holds whole groups (several whole
  sequences merged into one row where the batch split allows), else the group's tokens on one
  sequence shard."""
  if group_size <= t:
    part = group_size if (t // group_size) % seq_shards == 0 else t // seq_shards
    return (b, t // part, part), Groups(rows=1, span=group_size // part)
  seqs = group_size // t                                                # sequences per group
  if seq_shards > 1:
    return (b, seq_shards, t // seq_shards), Groups(rows=seqs, span=seq_shards)
  merge = math.gcd(seqs, b // batch_shards)                             # rows a shard holds whole
  return (b // merge, 1, merge * t), Groups(rows=seqs // merge, span=1)


def _shards(name: str) -> int:
  """Devices the logical activation axis `name` is split over (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for a in mesh_lib.axes_of(mesh_lib.spec((name,))[0]))


def select_bias_step(assigned: jax.Array, rate: float, rule: str = 'sign') -> jax.Array:
  """One aux-loss-free balancing update of the selection biases [..., E] toward under-loaded
  experts. assigned [..., E]: the step's token assignments per expert (integers, identical on
  every mesh, so the update is too). rule 'sign': `rate` times sign(mean - load) (DeepSeek-V3);
  'relative': `rate` times (mean - load) / mean, clipped to [-1, 1] (still at balance)."""
  mean = jnp.mean(assigned, axis=-1, keepdims=True)
  if rule == 'sign':
    return rate * jnp.sign(mean - assigned).astype(jnp.float32)
  error = (mean - assigned) / jnp.maximum(mean, 1.0)
  return rate * jnp.clip(error, -1.0, 1.0).astype(jnp.float32)
