"""Typed views of the ml_collections config, and its validation.

After `validate`, code reads the frozen dataclasses below (ModelConfig, Layout, DataConfig,
OptimConfig, RunConfig; moejax.train.plan.Plan holds them), not the ConfigDict; the ConfigDict
itself is only written into checkpoints and compared at resume. `validate` runs before anything
is compiled, one check per section, and names the keys (and a fix) for every inconsistency.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

from moejax.errors import ConfigError  # noqa: F401  (re-exported: raised throughout)

VOCAB_MULTIPLE = 128  # Megatron-style vocab padding: mesh-independent, divides every tp up to 128.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model's numbers depend on (nothing about the mesh except the stage split)."""
  vocab_size: int          # real vocabulary; logits of padded ids are masked
  d_model: int             # D
  num_heads: int           # N
  head_dim: int            # H
  d_ff: int                # F, expert hidden width
  num_blocks: int          # attention + MoE blocks
  max_len: int             # learned position table rows (unused with positions='rope')
  num_experts: int         # E
  top_k: int               # K
  capacity_factor: float   # training capacity factor
  eval_capacity_factor: float
  group_size: int          # tokens per routing group: a chunk of a sequence, or whole sequences
  expert_dropout: float
  aux_loss_weight: float
  z_loss_weight: float
  dtype: str               # compute dtype ('float32' or 'bfloat16'); params are float32
  init_std: float
  attn_bias: bool = True   # biases on q/k/v and the output projection (Megatron's default)
  gelu: str = 'exact'      # expert activation: 'exact' (erf, torch nn.GELU()) or 'tanh'
  normalize_gates: bool = False  # renormalise a token's kept top-k gates to sum to 1
  bias_update_rate: float = 0.0  # aux-loss-free balancing: per-step nudge of the selection bias
  bias_update_rule: str = 'sign'  # 'sign' (DeepSeek-V3) or 'relative' (by the load's error)
  sinkhorn_iters: int = 0        # >0: balance each routing group's choices in training (Sinkhorn)
  dispatch: str = 'capacity'     # 'capacity' (drop past C slots) or 'dropless'
  positions: str = 'learned'     # 'learned' (a [max_len, D] table, the seed's) or 'rope'

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  def capacity(self, train: bool = True) -> int:
    """Slots per expert per routing group: ceil(cf * group_size * k / E)."""
    cf = self.capacity_factor if train else self.eval_capacity_factor
    return max(1, math.ceil(cf * self.group_size * self.top_k / self.num_experts))


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """The device mesh: sizes of its axes and what is split over dp."""
  tp: int
  pp: int
  dp: int                  # data parallel: micro-batch sequences split over dp
  experts_over_dp: bool    # experts split over dp x tp ("parallel folding") instead of tp
  shard_optimizer: bool    # Adam moments sharded over dp as well (ZeRO-1)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The pipeline schedule: micro-batches, circular repeats, what the backward recomputes."""
  repeats: int             # circular pipeline repeats (r)
  num_micro_batches: int   # M
  remat_policy: str


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """One micro-batch: sequences and their length."""
  micro_batch_size: int    # sequences per micro-batch
  seq_len: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """How blocks and batches are laid over the mesh: the mesh, the pipeline schedule and the
  micro-batch shape (each its own type), with their fields readable here directly."""
  mesh: MeshShape
  schedule: Schedule
  batch: BatchShape

  tp = property(lambda self: self.mesh.tp)
  pp = property(lambda self: self.mesh.pp)
  dp = property(lambda self: self.mesh.dp)
  experts_over_dp = property(lambda self: self.mesh.experts_over_dp)
  shard_optimizer = property(lambda self: self.mesh.shard_optimizer)
  repeats = property(lambda self: self.schedule.repeats)
  num_micro_batches = property(lambda self: self.schedule.num_micro_batches)
  remat_policy = property(lambda self: self.schedule.remat_policy)
  micro_batch_size = property(lambda self: self.batch.micro_batch_size)
  seq_len = property(lambda self: self.batch.seq_len)

  @property
  def global_batch(self) -> int:
    return self.num_micro_batches * self.micro_batch_size

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch * self.seq_len

  @property
  def devices(self) -> int:
    return self.dp * self.tp * self.pp

  @property
  def expert_shards(self) -> int:
    """Devices one MoE layer's experts are split over."""
    return self.tp * (self.dp if self.experts_over_dp else 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from (the batch shape is the Layout's)."""
  source: str              # 'random', 'learnable' or 'tokens'
  path: str                # token dataset directory (source='tokens')
  pack: bool = False       # rows of whole documents (segment ids, positions) instead of windows
  buckets: tuple[int, ...] = ()   # row lengths of the steps (tokens per step fixed); () = seq_len


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay to lr * min_lr_ratio, global-norm clipping."""
  lr: float
  warmup_steps: int
  decay_steps: int
  min_lr_ratio: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float         # 0 disables


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long to train, and when to log, save, evaluate and profile."""
  num_steps: int
  seed: int
  log_every: int
  checkpoint_every: int    # 0: only at the end
  checkpoint_keep: int
  eval_every: int          # 0: never
  eval_batches: int
  init_from: str           # run directory to load params from ('' for none)
  profile_steps: range     # steps to trace (empty for none)


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
  from moejax.data import buckets
  return DataConfig(source=config.data.source, path=config.data.path, pack=bool(config.data.pack),
                    buckets=buckets.parse(config.data.buckets))


def bucket_layouts(config: ml_collections.ConfigDict) -> list[Layout]:
  """The layout of each sequence-length bucket (just the config's without buckets): rows of
  length Tb, micro_batch_size * seq_len / Tb of them per micro-batch."""
  lay = layout(config)
  lengths = data_config(config).buckets
  if not lengths:
    return [lay]
  budget = lay.micro_batch_size * lay.seq_len
  return [dataclasses.replace(lay, batch=BatchShape(max(budget // t, 1), t)) for t in lengths]


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  o = config.optim
  return OptimConfig(lr=float(o.lr), warmup_steps=int(o.warmup_steps),
                     decay_steps=int(o.decay_steps), min_lr_ratio=float(o.min_lr_ratio),
                     b1=float(o.b1), b2=float(o.b2), weight_decay=float(o.weight_decay),
                     grad_clip=float(o.grad_clip))


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
  c = config
  return RunConfig(num_steps=c.num_steps, seed=c.seed, log_every=c.log_every,
                   checkpoint_every=c.checkpoint_every, checkpoint_keep=c.checkpoint_keep,
                   eval_every=c.eval_every, eval_batches=c.eval_batches,
                   init_from=str(c.init_from or ''), profile_steps=profile_steps(c))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  m, moe = config.model, config.moe
  return ModelConfig(
      vocab_size=m.vocab_size, d_model=m.d_model, num_heads=m.num_heads, head_dim=m.head_dim,
      d_ff=moe.d_ff, num_blocks=m.num_blocks, max_len=m.max_len, num_experts=moe.num_experts,
      top_k=moe.top_k, capacity_factor=moe.capacity_factor,
      eval_capacity_factor=moe.eval_capacity_factor, group_size=moe.group_size,
      expert_dropout=moe.dropout, aux_loss_weight=moe.aux_loss_weight,
      z_loss_weight=moe.z_loss_weight, dtype=m.dtype, init_std=m.init_std,
      attn_bias=bool(m.attn_bias), gelu=moe.gelu, normalize_gates=bool(moe.normalize_gates),
      bias_update_rate=float(moe.bias_update_rate), bias_update_rule=moe.bias_update_rule,
      sinkhorn_iters=moe.sinkhorn_iters, dispatch=moe.dispatch,
      positions=m.positions)


def layout(config: ml_collections.ConfigDict) -> Layout:
  m = config.mesh
  return Layout(
      mesh=MeshShape(tp=m.tp, pp=m.pp, dp=m.dp,
                     experts_over_dp=bool(m.experts_over_dp) and m.dp > 1,
                     shard_optimizer=bool(m.shard_optimizer)),
      schedule=Schedule(repeats=config.pipeline.repeats,
                        num_micro_batches=config.data.num_micro_batches,
                        remat_policy=config.pipeline.remat_policy),
      batch=BatchShape(micro_batch_size=config.data.micro_batch_size,
                       seq_len=config.data.seq_len))


def layers_per_stage(model: ModelConfig, lay: Layout) -> int:
  return model.num_blocks // (lay.pp * lay.repeats)


REMAT_POLICIES = ('nothing_saveable', 'save_collectives', 'save_dots_and_collectives',
                  'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')
DTYPES = ('float32', 'bfloat16')
GELUS = ('exact', 'tanh')
DISPATCHES = ('capacity', 'dropless')
BIAS_RULES = ('sign', 'relative')
DATA_SOURCES = ('random', 'learnable', 'tokens')


SCHEMA: dict[str, tuple[str, ...]] = {
    'mesh': ('dp', 'tp', 'pp', 'experts_over_dp', 'shard_optimizer'),
    'model': ('vocab_size', 'd_model', 'num_heads', 'head_dim', 'num_blocks', 'max_len', 'dtype',
              'init_std', 'attn_bias', 'positions'),
    'moe': ('num_experts', 'top_k', 'd_ff', 'capacity_factor', 'eval_capacity_factor',
            'group_size', 'dropout', 'aux_loss_weight', 'z_loss_weight', 'gelu',
            'normalize_gates', 'bias_update_rate', 'bias_update_rule', 'sinkhorn_iters',
            'dispatch'),
    'pipeline': ('repeats', 'remat_policy'),
    'data': ('source', 'path', 'seq_len', 'micro_batch_size', 'num_micro_batches', 'pack',
             'buckets'),
    'optim': ('lr', 'warmup_steps', 'decay_steps', 'min_lr_ratio', 'b1', 'b2', 'weight_decay',
              'grad_clip'),
    '': ('num_steps', 'seed', 'log_every', 'checkpoint_every', 'checkpoint_keep', 'eval_every',
         'eval_batches', 'init_from', 'profile_steps'),
}


def known_keys() -> list[str]:
  return sorted(f'{s}.{k}' if s else k for s, keys in SCHEMA.items() for k in keys)


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Unknown or missing keys (a typo in a config file) are an error naming them."""
  have = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      have.update(f'{key}.{k}' for k in value.keys())
    else:
      have.add(key)
  known = set(known_keys())
  unknown, missing = sorted(have - known), sorted(known - have)
  if unknown or missing:
    raise ConfigError(
        (f'Unknown config keys: {unknown}. ' if unknown else '') +
        (f'Missing config keys: {missing}. ' if missing else '') +
        f'Known keys: {", ".join(sorted(known))}.')


def _check(errors: list[str], ok: bool, message: str) -> None:
  if not ok:
    errors.append(message)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError listing every inconsistent setting (with the keys and a fix)."""
  check_keys(config)
  m, lay = model_config(config), layout(config)
  _check_positive(config, m, lay)
  errors: list[str] = []
  _check_layout(errors, m, lay)
  _check_buckets(errors, config, m, lay)
  _check_model_values(errors, m)
  _check_run_values(errors, config, lay)
  if num_devices is not None:
    _check(errors, lay.devices <= num_devices,
           f'mesh.dp * mesh.tp * mesh.pp = {lay.dp}*{lay.tp}*{lay.pp} = {lay.devices} devices, '
           f'but only {num_devices} are available; shrink the mesh (--config.mesh.dp / .tp / '
           f'.pp) or run on more devices.')
  if errors:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(errors))
  if config.data.source == 'tokens':
    from moejax.data import tokens   # reads only the dataset's metadata and file sizes
    tokens.check(config.data.path, m.vocab_size, lay.seq_len)


def _check_positive(config: ml_collections.ConfigDict, m: ModelConfig, lay: Layout) -> None:
  positive = {'mesh.tp': lay.tp, 'mesh.pp': lay.pp, 'mesh.dp': lay.dp,
              'pipeline.repeats': lay.repeats, 'model.d_model': m.d_model,
              'model.num_heads': m.num_heads, 'model.head_dim': m.head_dim,
              'moe.d_ff': m.d_ff, 'model.num_blocks': m.num_blocks,
              'moe.num_experts': m.num_experts, 'moe.top_k': m.top_k,
              'moe.group_size': m.group_size, 'data.seq_len': lay.seq_len,
              'data.micro_batch_size': lay.micro_batch_size,
              'data.num_micro_batches': lay.num_micro_batches, 'num_steps': config.num_steps,
              'model.vocab_size': m.vocab_size, 'model.max_len': m.max_len}
  bad = [k for k, v in positive.items() if not (isinstance(v, int) and v >= 1)]
  if bad:
    raise ConfigError('These keys must be positive integers: ' + ', '.join(
        f'{k}={positive[k]!r}' for k in bad))


def _check_layout(errors: list[str], m: ModelConfig, lay: Layout) -> None:
  """How the model and batch divide over the mesh and the pipeline."""
  tp, pp, dp, r = lay.tp, lay.pp, lay.dp, lay.repeats
  _check(errors, m.num_heads % tp == 0,
         f'model.num_heads={m.num_heads} is not divisible by mesh.tp={tp}: attention heads are '
         f'split over tp; choose num_heads as a multiple of tp or a tp dividing it.')
  if lay.experts_over_dp:
    _check(errors, m.num_experts % (dp * tp) == 0,
           f'moe.num_experts={m.num_experts} is not divisible by mesh.dp * mesh.tp = {dp}*{tp}: '
           f'with mesh.experts_over_dp experts are split over dp x tp; choose num_experts as a '
           f'multiple of {dp * tp} or set mesh.experts_over_dp=False.')
  else:
    _check(errors, m.num_experts % tp == 0,
           f'moe.num_experts={m.num_experts} is not divisible by mesh.tp={tp}: experts are '
           f'split over tp; choose num_experts as a multiple of tp.')
  _check(errors, lay.micro_batch_size % dp == 0,
         f'data.micro_batch_size={lay.micro_batch_size} is not divisible by mesh.dp={dp}: each '
         f'micro-batch\'s sequences are split over dp; use a multiple of dp.')
  _check(errors, m.num_blocks % (pp * r) == 0,
         f'model.num_blocks={m.num_blocks} is not divisible by mesh.pp * pipeline.repeats = '
         f'{pp}*{r}: every stage needs the same number of blocks per repeat.')
  _check(errors, lay.num_micro_batches % pp == 0,
         f'data.num_micro_batches={lay.num_micro_batches} is not divisible by mesh.pp={pp}: '
         f'embedding, head and loss split the micro-batches over pp.')
  _check(errors, lay.num_micro_batches >= pp,
         f'data.num_micro_batches={lay.num_micro_batches} < mesh.pp={pp}: with fewer micro-batches '
         f'than stages some stages never work (bubble (pp-1)/(M+pp-1) above 50%); use at least '
         f'pp micro-batches.')
  _check(errors, lay.seq_len <= m.max_len or m.positions == 'rope',
         f'data.seq_len={lay.seq_len} is longer than the position table model.max_len='
         f'{m.max_len}; raise model.max_len or shorten data.seq_len.')
  t, g = lay.seq_len, m.group_size
  if g > t:
    _check(errors, g % t == 0 and lay.micro_batch_size % (g // t) == 0,
           f'moe.group_size={g} is longer than data.seq_len={t} but is not a whole number of '
           f'the micro-batch\'s sequences (data.micro_batch_size={lay.micro_batch_size}): a '
           f'routing group is a chunk of one sequence or whole sequences; use a divisor of {t} '
           f'or {t} x a divisor of {lay.micro_batch_size}.')
    _check(errors, t % tp == 0,
           f'data.seq_len={t} is not divisible by mesh.tp={tp}: a group of whole sequences is '
           f'routed in the sequence\'s tp shards; use a seq_len that is a multiple of {tp}.')
    return
  _check(errors, t % g == 0,
         f'data.seq_len={t} is not divisible by moe.group_size={g}: routing groups are '
         f'contiguous chunks of one sequence (or whole sequences); use a divisor of {t} or a '
         f'multiple of it.')
  if t % g == 0:
    groups, share = t // g, t // tp
    spans = t % tp == 0 and g % max(share, 1) == 0
    _check(errors, groups % tp == 0 or spans,
           f'data.seq_len / moe.group_size = {groups} routing groups per sequence do not divide '
           f'over mesh.tp={tp}: each tp shard of the sequence ({share} tokens) must hold whole '
           f'groups, or each group whole shards; use a moe.group_size that divides or is a '
           f'multiple of {share}.')


def _check_buckets(errors: list[str], config: ml_collections.ConfigDict, m: ModelConfig,
                   lay: Layout) -> None:
  """Every bucket keeps the tokens per step and fits the mesh like data.seq_len must."""
  try:
    lengths = data_config(config).buckets
  except ValueError:
    errors.append(f'data.buckets={config.data.buckets!r}: expected comma-separated sequence '
                  f'lengths, e.g. "128,256,512".')
    return
  budget = lay.micro_batch_size * lay.seq_len
  for t in lengths:
    if t <= 0 or budget % t:
      errors.append(f'data.buckets: {t} does not divide the tokens per micro-batch '
                    f'data.micro_batch_size * data.seq_len = {budget}; use divisors of it.')
  if errors:
    return
  for bucket in bucket_layouts(config)[1 if not lengths else 0:]:
    before = len(errors)
    _check_layout(errors, m, bucket)
    errors[before:] = [f'bucket {bucket.seq_len} (data.micro_batch_size becomes '
                       f'{bucket.micro_batch_size}): {e}' for e in errors[before:]]


def _check_model_values(errors: list[str], m: ModelConfig) -> None:
  """Choices and ranges of the model and moe keys."""
  _check(errors, m.top_k <= m.num_experts,
         f'moe.top_k={m.top_k} > moe.num_experts={m.num_experts}; top_k must not exceed the '
         f'number of experts.')
  _check(errors, m.capacity_factor > 0 and m.eval_capacity_factor > 0,
         'moe.capacity_factor and moe.eval_capacity_factor must be > 0.')
  _check(errors, 0.0 <= m.expert_dropout < 1.0, f'moe.dropout={m.expert_dropout} not in [0, 1).')
  _check(errors, m.dtype in DTYPES, f'model.dtype={m.dtype!r} not one of {DTYPES}.')
  _check(errors, m.positions in ('learned', 'rope'),
         f"model.positions={m.positions!r} not one of ('learned', 'rope').")
  _check(errors, m.positions != 'rope' or m.head_dim % 2 == 0,
         f'model.head_dim={m.head_dim} must be even for rotary positions (model.positions=rope).')
  _check(errors, m.gelu in GELUS, f'moe.gelu={m.gelu!r} not one of {GELUS}.')
  _check(errors, m.dispatch in DISPATCHES,
         f'moe.dispatch={m.dispatch!r} not one of {DISPATCHES}.')
  _check(errors, m.bias_update_rule in BIAS_RULES,
         f'moe.bias_update_rule={m.bias_update_rule!r} not one of {BIAS_RULES}.')
  _check(errors, m.bias_update_rate >= 0,
         f'moe.bias_update_rate={m.bias_update_rate} must be >= 0 (0 turns bias balancing off).')
  _check(errors, isinstance(m.sinkhorn_iters, int) and m.sinkhorn_iters >= 0,
         f'moe.sinkhorn_iters={m.sinkhorn_iters!r} must be an integer >= 0 (0 turns in-group '
         'balancing off; 10-20 is typical).')


def _check_run_values(errors: list[str], config: ml_collections.ConfigDict, lay: Layout) -> None:
  """Choices and ranges of the pipeline, data and run-control keys."""
  _check(errors, lay.remat_policy in REMAT_POLICIES,
         f'pipeline.remat_policy={lay.remat_policy!r} not one of {REMAT_POLICIES}.')
  _check(errors, config.data.source in DATA_SOURCES,
         f'data.source={config.data.source!r} not one of {DATA_SOURCES}.')
  _check(errors, not config.data.pack or config.data.source == 'tokens',
         f'data.pack packs the documents of a token dataset; set data.source=tokens (and '
         f'data.path), or data.pack=False for data.source={config.data.source!r}.')
  _check(errors, config.log_every >= 1, f'log_every={config.log_every} must be >= 1.')
  try:
    profile_steps(config)
  except ConfigError as e:
    errors.append(str(e))
  _check(errors, config.checkpoint_every >= 0,
         f'checkpoint_every={config.checkpoint_every} must be >= 0 (0 saves only at the end).')


def profile_steps(config: ml_collections.ConfigDict) -> range:
  """Steps to trace from config.profile_steps: '' (none), 'N' or 'FIRST-LAST'."""
  text = str(config.profile_steps).strip()
  if not text:
    return range(0)
  first, _, last = text.partition('-')
  try:
    lo, hi = int(first), int(last or first)
  except ValueError:
    lo, hi = -1, -1
  if not 1 <= lo <= hi:
    raise ConfigError(f'profile_steps={text!r}: expected a step N or a range FIRST-LAST of steps '
                      f'>= 1, e.g. --config.profile_steps=10-12.')
  return range(lo, hi + 1)


def describe(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Derived numbers of a config (computed, never typed into config files)."""
  m, lay = model_config(config), layout(config)
  return {
      'global_batch': lay.global_batch,
      'tokens_per_step': lay.tokens_per_step,
      'local_experts_per_device': m.num_experts // lay.expert_shards,
      'layers_per_stage': layers_per_stage(m, lay),
      'capacity_per_group': m.capacity(True),
      'padded_vocab': m.padded_vocab,
      'devices': lay.devices,
  }
