"""The Mixture-of-Experts layer: route, dispatch, expert FFN, combine, on each shard of the
expert-parallel axes (moejax.parallel.experts moves the rows between shards). Two dispatches:
'capacity' (overflow dropped; the seed's) and 'dropless' (nothing dropped). At capacity, a
routing group held in one part fills fixed [E, C] buffers; a group split into parts (over shards
or rows) sends only its kept rows, as dropless sends every row: assignments sorted by expert,
ragged exchange, grouped matmuls.

Legend: B batch, T seq, D d_model; the tokens are routed in parts [B', nG, S] (B' rows of nG
parts of S tokens; a part is a routing group or one shard's piece of one), G_ local parts,
E experts, C capacity, F expert hidden, K top-k, A_ = G_*K*S assignments. Names ending in `_`
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

from moejax.model import ffn as ffn_lib, routing
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
GROUP_AXES = ('act_batch', 'act_groups')  # leading axes of [B', nG, S, D] token parts


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
  """Where routing groups sit in the MoE's token parts [B', nG, S] (moe() lays x [B, T, D] out
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


def _dispatched_row_ids(gid: jax.Array, num_experts: int, capacity: int,
                        axes: tuple[str, ...]) -> jax.Array:
  """Mesh-independent name of every row of the dispatched buffer [E/ep, ep*G_*C]:
  (global group * E + global expert) * C + slot; gid [ep, G_] every source's part groups."""
  ep = gid.shape[0]
  local = num_experts // ep
  expert = jax.lax.axis_index(axes) * local + jnp.arange(local)       # [E/ep] global ids
  ids = ((gid[None, :, :, None] * num_experts + expert[:, None, None, None]) * capacity
         + jnp.arange(capacity))                                       # [E/ep, ep, G_, C]
  return ids.reshape(local, -1)                                        # [E/ep, ep*G_*C]


def _assignment_ids(gid_: jax.Array, start_: jax.Array, top_k: int, s: int,
                    group_size: int) -> jax.Array:
  """Mesh-independent name of each of this shard's token assignments [G_*K*S] in (g, k, s)
  order: (global group * K + k) * group_size + position in the group; gid_, start_ [G_]."""
  at = start_[:, None, None] + jnp.arange(s)                           # [G_, 1, S]
  return ((gid_[:, None, None] * top_k + jnp.arange(top_k)[:, None]) * group_size
          + at).reshape(-1)                                            # [G_*K*S]


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


def _capacity_experts(w_: ExpertWeights, tokens_: jax.Array, r: routing.Routing,
                      rng: jax.Array, *, axes: tuple[str, ...],
                      names: tuple[jax.Array, jax.Array], settings: MoESettings) -> jax.Array:
  """Expert outputs for tokens_ [G_, S, D] in fixed buffers: every expert gets `capacity` rows
  per part, full or not (assignments past them were dropped by routing)."""
  g_, s, d = tokens_.shape
  num_experts = w_.router.shape[-1]
  capacity, dropout_rate = settings.capacity, settings.dropout_rate
  compute_dtype, act = settings.compute_dtype, settings.act
  buf_ = routing.dispatch(tokens_.astype(compute_dtype), r, num_experts, capacity)  # [G_, E, C, D]
  buf_ = buf_.transpose(1, 0, 2, 3).reshape(num_experts, -1, d)          # [E, G_*C, D]
  keep = None
  if dropout_rate > 0.0:   # a unit's mask follows its token, slot and expert, not the device
    rows = _dispatched_row_ids(names[0], num_experts, capacity, axes)
    keep = ffn_lib.dropout_keep(rng, rows, w_.w1.shape[-1], dropout_rate)   # [E/ep, ep*G_*C, F]
  local_experts = lambda rows_: ffn_lib.expert_ffn(                     # [E/ep, ep*G_*C, D]
      rows_, w_.ffn(compute_dtype), act=act, dropout_rate=dropout_rate, dropout_keep=keep)
  out_ = ep_lib.exchange(buf_, local_experts, axes)                     # [E, G_*C, D]
  out_ = out_.reshape(num_experts, g_, capacity, d).transpose(1, 0, 2, 3)  # [G_, E, C, D]
  return routing.combine(out_, r)                                       # [G_, S, D]


def _row_experts(w_: ExpertWeights, tokens_: jax.Array, r: routing.Routing,
                 rng: jax.Array, *, axes: tuple[str, ...],
                 names: tuple[jax.Array, jax.Array], settings: MoESettings) -> jax.Array:
  """Expert outputs for tokens_ [G_, S, D] by rows: the shard's K*G_*S assignments (dropless),
  or only those routing kept (capacity), sorted by expert, travel as ragged rows to their
  expert's shard, where each expert multiplies exactly the rows it received (grouped matmuls).
  At capacity a unit's dropout mask follows the slot it took, as in _capacity_experts."""
  g_, s, d = tokens_.shape
  capacity, dropout_rate = settings.dispatch == 'capacity', settings.dropout_rate
  compute_dtype, act = settings.compute_dtype, settings.act
  k = r.expert.shape[1]
  num_experts = w_.router.shape[-1]
  local = w_.w1.shape[0]                                                # E/ep on this shard
  # [A_] (g, k, s) order; a dropped assignment gets expert E: sorted last and never sent
  expert = (jnp.where(r.keep, r.expert, num_experts) if capacity else r.expert).reshape(-1)
  order = jnp.argsort(expert, stable=True)                              # by expert = by shard
  token = (jnp.arange(g_)[:, None, None] * s + jnp.arange(s)) * jnp.ones((1, k, 1), jnp.int32)
  rows_ = tokens_.reshape(-1, d).astype(compute_dtype)[token.reshape(-1)[order]]  # [A_, D]
  send = jnp.bincount(expert // local, length=num_experts // local)     # [ep] rows per shard
  keys = (expert[order] % local)[:, None]                               # [A_, 1] local expert
  if dropout_rate > 0.0:   # a unit's mask follows its (token, choice) or slot, not the device
    me = jax.lax.axis_index(axes)
    ids = (_kept_slot_ids(names[0][me], r, num_experts, settings.capacity) if capacity else
           _assignment_ids(names[0][me], names[1][me], k, s, settings.group_size))[order]
    keys = jnp.concatenate([keys, ids[:, None]], axis=1)                # [A_, 2]
  local_experts = lambda rows, keys_: ffn_lib.grouped_expert_ffn(       # [ep*A_, D]
      rows, keys_[:, 0], w_.ffn(compute_dtype), act=act, dropout_rate=dropout_rate,
      dropout_rng=rng, row_ids=keys_[:, -1])
  out_ = ep_lib.ragged_exchange(rows_, keys, send, local_experts, axes, pad_key=local)  # [A_, D]
  out_ = jnp.zeros_like(out_).at[order].set(out_, unique_indices=True)  # [A_, D] (g, k, s) order
  weight = jnp.where(r.keep, r.gate, 0.0).astype(out_.dtype)            # [G_, K, S]
  return jnp.einsum('GKSD,GKS->GSD', out_.reshape(g_, k, s, d), weight)  # [G_, S, D]


def _kept_slot_ids(gid_: jax.Array, r: routing.Routing, num_experts: int,
                   capacity: int) -> jax.Array:
  """The names _dispatched_row_ids gives the slots this shard's assignments took [G_*K*S]
  ((global group * E + expert) * C + slot; dropped assignments get names never used)."""
  ids = (gid_[:, None, None] * num_experts + r.expert) * capacity + r.slot   # [G_, K, S]
  return jnp.where(r.keep, ids, -1).reshape(-1)


def sends_rows(dispatch: str, groups: Groups) -> bool:
  """Whether the experts' tokens travel as ragged rows (dropless; capacity where a routing group
  is split into parts, each of which would carry the group's whole capacity: P x the expert
  matmuls) rather than in fixed [E, C] buffers (capacity, each group in one part)."""
  return dispatch == 'dropless' or groups.parts > 1


def _expert_path(settings: MoESettings, groups: Groups):
  return _row_experts if sends_rows(settings.dispatch, groups) else _capacity_experts


def _moe_local(w_: ExpertWeights, inputs_: tuple, rng: jax.Array, *, axes: tuple[str, ...],
               token_spec: P, groups: Groups, settings: MoESettings
               ) -> tuple[jax.Array, routing.GroupStats]:
  """Shard-local MoE: (x_ [B_, nG_, S, D], valid_ [B_, nG_, S] or None) -> ([B_, nG_, S, D],
  per-part stats); `groups` says which parts make one routing group."""
  x_, valid_ = inputs_
  b_, ng_, s, d = x_.shape
  tokens_ = x_.reshape(b_ * ng_, s, d)                                  # [G_, S, D]
  valid_ = None if valid_ is None else valid_.reshape(b_ * ng_, s)     # [G_, S]
  names = _part_names(b_, ng_, s, groups, axes, token_spec)             # [ep, G_] x 2
  share = None
  if groups.parts > 1:   # a group's parts may lie on any shard the tokens are split over
    every = ep_lib.manual_axes(token_spec, axes)
    share = _group_share(*_part_names(b_, ng_, s, groups, every, token_spec), every)
  r, stats = routing.route(tokens_, w_.router, settings.top_k, settings.route_capacity,
                           settings.normalize_gates, w_.select_bias, valid_, share,
                           settings.sinkhorn_iters, w_.router_bias, settings.scoring)
  y_ = _expert_path(settings, groups)(w_, tokens_, r, rng, axes=axes, names=names,
                                      settings=settings)               # [G_, S, D]
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
  shape, groups = _layout(b, t, settings.group_size)                    # [B', nG, S]
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
  """The parts [B', nG, S] x [B, T] is cut into for routing, and how they make groups, when
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
