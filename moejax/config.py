"""Typed views of the ml_collections config: the keys it has (SCHEMA) and the frozen dataclasses
built from it.

After `moejax.validation.validate`, code reads the dataclasses below (ModelConfig, Layout,
DataConfig, OptimConfig, RunConfig; moejax.train.plan.Plan holds them), not the ConfigDict; the
ConfigDict itself is only written into checkpoints and compared at resume.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections

from moejax.errors import ConfigError

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
  rope_base: float = 10_000.0    # rotary base (Mixtral, Qwen3: 1e6)
  norm: str = 'layernorm'        # 'layernorm' (GPT-2, the seed's) or 'rmsnorm' (Llama family)
  norm_eps: float = 1e-5
  num_kv_heads: int = 0          # grouped-query attention: key/value heads (0: num_heads)
  qk_norm: str = 'none'          # RMSNorm of queries and keys: 'none', 'full' (OLMoE), 'head' (Qwen3)
  ffn: str = 'gelu'              # expert FFN: 'gelu' (w1, w2) or 'swiglu' (silu(x w1) * x w3, w2)
  expert_bias: bool = True       # biases in the expert FFNs (the seed's)
  family: str = ''               # the open family (convert/families.py) or '' (moejax's own)
  normalize_gates_over: str = 'kept'  # with normalize_gates: over the 'kept' gates (after
                                      # capacity; NLLB) or the 'top_k' choices (before; HF)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def gate_norm(self) -> str:
    """'none', 'kept' or 'top_k': which gates a token's gates are renormalised over."""
    return self.normalize_gates_over if self.normalize_gates else 'none'

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
      positions=m.positions, **{k: _get(config, s, k) for s, k in ARCH_KEYS})


# Architecture keys added for the open model families, with the values that keep the seed's
# model; a config (or a checkpoint's saved config) without them means these values.
ARCH_DEFAULTS: dict[tuple[str, str], object] = {
    ('model', 'rope_base'): 10_000.0, ('model', 'norm'): 'layernorm', ('model', 'norm_eps'): 1e-5,
    ('model', 'num_kv_heads'): 0, ('model', 'qk_norm'): 'none', ('moe', 'ffn'): 'gelu',
    ('moe', 'expert_bias'): True, ('moe', 'normalize_gates_over'): 'kept', ('model', 'family'): ''}
ARCH_KEYS = tuple(ARCH_DEFAULTS)


def _get(config: ml_collections.ConfigDict, section: str, key: str):
  """config.section.key, or its ARCH_DEFAULTS value where a config predates the key."""
  value = config[section].get(key, None)
  return ARCH_DEFAULTS[(section, key)] if value is None else value


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
NORMS = ('layernorm', 'rmsnorm')
QK_NORMS = ('none', 'full', 'head')
FFNS = ('gelu', 'swiglu')
GATE_NORMS_OVER = ('kept', 'top_k')


SCHEMA: dict[str, tuple[str, ...]] = {
    'mesh': ('dp', 'tp', 'pp', 'experts_over_dp', 'shard_optimizer'),
    'model': ('vocab_size', 'd_model', 'num_heads', 'head_dim', 'num_blocks', 'max_len', 'dtype',
              'init_std', 'attn_bias', 'positions', 'rope_base', 'norm', 'norm_eps',
              'num_kv_heads', 'qk_norm', 'family'),
    'moe': ('num_experts', 'top_k', 'd_ff', 'capacity_factor', 'eval_capacity_factor',
            'group_size', 'dropout', 'aux_loss_weight', 'z_loss_weight', 'gelu',
            'normalize_gates', 'bias_update_rate', 'bias_update_rule', 'sinkhorn_iters',
            'dispatch', 'ffn', 'expert_bias', 'normalize_gates_over'),
    'pipeline': ('repeats', 'remat_policy'),
    'data': ('source', 'path', 'seq_len', 'micro_batch_size', 'num_micro_batches', 'pack',
             'buckets'),
    'optim': ('lr', 'warmup_steps', 'decay_steps', 'min_lr_ratio', 'b1', 'b2', 'weight_decay',
              'grad_clip'),
    '': ('num_steps', 'seed', 'log_every', 'checkpoint_every', 'checkpoint_keep', 'eval_every',
         'eval_batches', 'init_from', 'profile_steps', 'hf_dir'),
}


def known_keys() -> list[str]:
  return sorted(f'{s}.{k}' if s else k for s, keys in SCHEMA.items() for k in keys)


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
