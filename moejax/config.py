"""Typed views of the ml_collections config, and the config's keys.

Each field of the frozen dataclasses below (ModelConfig, MeshShape, Schedule, BatchShape,
DataConfig, OptimConfig, RunConfig) is one config key: `key('section.name', rule)` says which key
fills it, what a valid value is, and its value where a config or a saved checkpoint predates it.
Adding a key is a field here and its line in the config files (configs/tp4pp4.py,
moejax/config_files.py); checks that relate several keys live in moejax.validation. After
`moejax.validation.validate`, code reads these dataclasses (moejax.train.plan.Plan holds them);
the ConfigDict is written into checkpoints, compared at resume and read by the config files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import ml_collections

from moejax.errors import ConfigError

VOCAB_MULTIPLE = 128  # Megatron-style vocab padding: mesh-independent, divides every tp up to 128.


class Rule(NamedTuple):
  """What a key's value must be: `ok(value)`, and the sentence said when it is not."""
  ok: Callable[[Any], bool]
  says: str


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE = Rule(lambda v: _is_int(v) and v >= 1, 'must be a positive integer')
COUNT = Rule(lambda v: _is_int(v) and v >= 0, 'must be an integer >= 0')
POSITIVE_NUMBER = Rule(lambda v: _is_number(v) and v > 0, 'must be a finite number > 0')
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, 'must be a finite number >= 0')


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, f'must be one of {choices}')


def within(lo: float, hi: float, says: str) -> Rule:
  """lo <= value < hi."""
  return Rule(lambda v: _is_number(v) and lo <= v < hi, says)


def key(path: str, rule: Rule | None = None, *, default: Any = dataclasses.MISSING,
        parse: Callable[[Any], Any] | None = None, run: bool = False):
  """A dataclass field read from config key `path` ('section.name', or 'name' at the top).

  rule: what a valid value is (checked by validation, named with the key in the error).
  default: the value where a config or a checkpoint's saved config lacks the key (the value
    that keeps the models trained before the key existed); without one, the key is required.
  parse: turns the config's value into the field's (e.g. '128,256' -> (128, 256)).
  run: a model key that changes how the same parameters are trained or run, not what they
    are: a resume may change it (it is listed), where any other model key must match.
  """
  return dataclasses.field(default=default, metadata=dict(path=path, rule=rule, parse=parse,
                                                          run=run))

REMAT_POLICIES = ('nothing_saveable', 'save_collectives', 'save_dots_and_collectives',
                  'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')
UNIT = within(0.0, 1.0, 'must be in [0, 1)')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model's numbers depend on (nothing about the mesh except the stage split)."""
  vocab_size: int = key('model.vocab_size', POSITIVE)   # real vocabulary; padded ids masked
  d_model: int = key('model.d_model', POSITIVE)         # D
  num_heads: int = key('model.num_heads', POSITIVE)     # N
  head_dim: int = key('model.head_dim', POSITIVE)       # H
  d_ff: int = key('moe.d_ff', POSITIVE)                 # F, expert hidden width
  num_blocks: int = key('model.num_blocks', POSITIVE)   # attention + MoE blocks
  max_len: int = key('model.max_len', POSITIVE)   # learned position rows (unused with rope)
  num_experts: int = key('moe.num_experts', POSITIVE)   # E
  top_k: int = key('moe.top_k', POSITIVE)               # K
  # Training capacity: each expert takes capacity_factor x group tokens x top_k / experts per group.
  capacity_factor: float = key('moe.capacity_factor', POSITIVE_NUMBER, run=True)
  # Capacity factor in evaluation.
  eval_capacity_factor: float = key('moe.eval_capacity_factor', POSITIVE_NUMBER, run=True)
  # Tokens per routing group: a chunk of a sequence, or whole sequences.
  group_size: int = key('moe.group_size', POSITIVE, run=True)
  # Dropout inside the experts (training).
  expert_dropout: float = key('moe.dropout', UNIT, run=True)
  # Weight of the Switch load-balancing loss (summed over MoE layers).
  aux_loss_weight: float = key('moe.aux_loss_weight', NON_NEGATIVE, run=True)
  # Weight of the router z-loss.
  z_loss_weight: float = key('moe.z_loss_weight', NON_NEGATIVE, run=True)
  # Compute dtype; params are float32.
  dtype: str = key('model.dtype', one_of('float32', 'bfloat16'), run=True)
  # Standard deviation of the normal init of the matrices.
  init_std: float = key('model.init_std', POSITIVE_NUMBER, run=True)
  # Biases on q/k/v and the output projection (Megatron's default).
  attn_bias: bool = key('model.attn_bias', default=True, parse=bool)
  # Expert activation: 'exact' (erf, torch nn.GELU()) or 'tanh'.
  gelu: str = key('moe.gelu', one_of('exact', 'tanh'), default='exact')
  # Renormalise a token's gates to sum to 1 (over normalize_gates_over).
  normalize_gates: bool = key('moe.normalize_gates', default=False, parse=bool)
  # Aux-loss-free balancing: per-step nudge of the selection bias, 'sign' (DeepSeek-V3) or
  # 'relative' (by the load's error).
  bias_update_rate: float = key('moe.bias_update_rate', NON_NEGATIVE, default=0.0, parse=float)
  # How the selection bias moves: 'sign' or 'relative' (see bias_update_rate).
  bias_update_rule: str = key('moe.bias_update_rule', one_of('sign', 'relative'), default='sign',
                              run=True)
  # > 0: balance each routing group's choices in training (Sinkhorn iterations, 10-20 typical).
  sinkhorn_iters: int = key('moe.sinkhorn_iters', COUNT, default=0, run=True)
  # 'capacity' (drop past C slots) or 'dropless'.
  dispatch: str = key('moe.dispatch', one_of('capacity', 'dropless'), default='capacity', run=True)
  # 'learned' (a [max_len, D] table, the seed's) or 'rope'.
  positions: str = key('model.positions', one_of('learned', 'rope'), default='learned')
  # Rotary frequency base (1e4, 1e6).
  rope_base: float = key('model.rope_base', Rule(lambda v: _is_number(v) and v > 1,
                                                 'must be > 1 (1e4 or 1e6)'), default=10_000.0)
  # 'layernorm' (GPT-2, the seed's) or 'rmsnorm' (Llama family).
  norm: str = key('model.norm', one_of('layernorm', 'rmsnorm'), default='layernorm')
  # Epsilon of the norms.
  norm_eps: float = key('model.norm_eps', POSITIVE_NUMBER, default=1e-5)
  # Grouped-query attention: key/value heads (0: num_heads).
  num_kv_heads: int = key('model.num_kv_heads', COUNT, default=0)
  # RMSNorm of queries and keys: 'none', 'full' (OLMoE), 'head' (Qwen3).
  qk_norm: str = key('model.qk_norm', one_of('none', 'full', 'head'), default='none')
  # Expert FFN: 'gelu' (w1, w2), 'swiglu' (silu(x w1) * x w3, w2) or 'clamped_swiglu'
  # (GPT-OSS: g = min(x w1, limit), u = clip(x w3, +-limit), (u + 1) g sigmoid(alpha g), w2).
  ffn: str = key('moe.ffn', one_of('gelu', 'swiglu', 'clamped_swiglu'), default='gelu')
  expert_bias: bool = key('moe.expert_bias', default=True, parse=bool)   # the seed's biases
  # The open family (convert/families.py; checked in validation) or '' (moejax's own).
  family: str = key('model.family', default='')
  # Attention kernel: 'auto' (cuDNN's fused attention on NVIDIA GPUs where it applies, XLA's
  # elsewhere), 'xla' or 'cudnn' (moejax.kernels.attention).
  attention: str = key('model.attention', one_of('auto', 'xla', 'cudnn'), default='auto',
                       run=True)
  # With normalize_gates: over the 'kept' gates (after capacity; NLLB) or the 'top_k' choices
  # (before; HF).
  normalize_gates_over: str = key('moe.normalize_gates_over', one_of('kept', 'top_k'),
                                  default='kept')
  # With attn_bias: the output projection's bias too (Qwen2-MoE's attention has q/k/v biases
  # only).
  attn_out_bias: bool = key('model.attn_out_bias', default=True, parse=bool)
  # Hidden width of an always-on shared expert beside the routed ones (0: none; DeepSeek's
  # n_shared_experts x moe_intermediate_size, Qwen2-MoE's shared_expert_intermediate_size);
  # the experts' activation (moe.ffn), no biases, split over tp like attention's heads.
  shared_d_ff: int = key('moe.shared_d_ff', COUNT, default=0)
  # The shared expert's output scaled by sigmoid(x . w) of a learned [D] gate (Qwen2-MoE).
  shared_gate: bool = key('moe.shared_gate', default=False, parse=bool)
  # moe.ffn=clamped_swiglu's clamp and sigmoid slope (GPT-OSS: 7.0, 1.702).
  swiglu_limit: float = key('moe.swiglu_limit', POSITIVE_NUMBER, default=7.0, parse=float)
  # The clamped SwiGLU's sigmoid slope (see swiglu_limit).
  swiglu_alpha: float = key('moe.swiglu_alpha', POSITIVE_NUMBER, default=1.702, parse=float)
  # Expert scores: 'softmax' over the experts, or each expert's 'sigmoid' (DeepSeek-V3: chosen on
  # sigmoid + selection bias, gates the chosen sigmoids, renormalised with normalize_gates).
  router_score: str = key('moe.router_score', one_of('softmax', 'sigmoid'), default='softmax')
  # Group-limited routing (DeepSeek-V3's n_group, topk_group): experts in expert_groups groups;
  # a token chooses within the top_groups groups whose two best scores sum highest (1: off).
  expert_groups: int = key('moe.expert_groups', POSITIVE, default=1)
  # Groups a token chooses within (see expert_groups).
  top_groups: int = key('moe.top_groups', POSITIVE, default=1)
  # Gates times this (DeepSeek-V3's routed_scaling_factor).
  routed_scale: float = key('moe.routed_scale', POSITIVE_NUMBER, default=1.0, parse=float)
  # Dense blocks before the MoE blocks (DeepSeek-V3's first_k_dense_replace): attention and a
  # SwiGLU (moe.ffn) MLP of dense_d_ff hidden units split over tp; they run on each micro-batch
  # before the pipeline (micro-batches split over pp), their params replicated over pp.
  dense_blocks: int = key('model.dense_blocks', COUNT, default=0)
  # Hidden width of the dense blocks' MLP (see dense_blocks, dense_per_block).
  dense_d_ff: int = key('model.dense_d_ff', COUNT, default=0)
  # Dense layers inside each (MoE) block, before its own attention and MoE: every block is this
  # many dense layers (attention and an MLP of dense_d_ff) then one MoE layer (Qwen's
  # decoder_sparse_step - 1); pipelined with the block.
  dense_per_block: int = key('model.dense_per_block', COUNT, default=0)
  # Multi-token prediction (DeepSeek-V3 section 2.2) when mtp_depth > 0: depth d (1..mtp_depth)
  # joins the previous depth's hidden state (the last block's at d=1) and the embedding of token
  # t+d, each normalised (model.norm), by a [2D, D] projection, runs one MoE block and predicts token
  # t+1+d through its own final norm and the shared LM head; the mean of the depths' CE, times
  # mtp_loss_weight, joins the loss. Training only: generation uses the main model.
  mtp_depth: int = key('model.mtp_depth', COUNT, default=0)
  # Weight of the mean multi-token-prediction CE in the loss (see mtp_depth).
  mtp_loss_weight: float = key('model.mtp_loss_weight', POSITIVE_NUMBER, default=0.3,
                               parse=float, run=True)
  # A selection bias [E] even without balancing updates (an imported e_score_correction_bias).
  selection_bias: bool = key('moe.selection_bias', default=False, parse=bool)
  # A learned bias [E] on the router's logits (GPT-OSS).
  router_bias: bool = key('moe.router_bias', default=False, parse=bool)
  # A learned logit per head joining every softmax over the keys with no value (attention
  # sinks, GPT-OSS).
  attn_sinks: bool = key('model.attn_sinks', default=False, parse=bool)
  # Sliding-window attention: a query sees itself and the sliding_window - 1 positions before
  # it (0: no window), in the blocks window_pattern marks 'S' (block b follows letter
  # b % len: 'SF' alternates windowed and full, GPT-OSS; '': every block windowed).
  sliding_window: int = key('model.sliding_window', COUNT, default=0)
  # Which blocks are windowed: 'S'/'F' letters by block index (see sliding_window).
  window_pattern: str = key('model.window_pattern', Rule(
      lambda v: isinstance(v, str) and set(v) <= {'S', 'F'},
      "must be a string of 'S' (windowed) and 'F' (full) letters, e.g. 'SF'"), default='')
  # Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: keys and values from a
  # shared latent of kv_lora_rank (RMS-normalised; what the KV cache stores, with one rotary key
  # of rope_head_dim per token), queries through a q_lora_rank latent (0: a plain projection);
  # each head's key is head_dim non-rotary features and the rotary ones, its value v_head_dim.
  kv_lora_rank: int = key('model.kv_lora_rank', COUNT, default=0)
  # MLA: the query latent's width (0: a plain query projection).
  q_lora_rank: int = key('model.q_lora_rank', COUNT, default=0)
  # MLA: rotary features per head (one shared rotary key per token).
  rope_head_dim: int = key('model.rope_head_dim', COUNT, default=0)
  # MLA: value width per head.
  v_head_dim: int = key('model.v_head_dim', COUNT, default=0)
  # > 0: the softmax scale times (0.1 x softmax_mscale x ln(rope_factor) + 1)^2 (DeepSeek's YaRN
  # mscale_all_dim).
  softmax_mscale: float = key('model.softmax_mscale', NON_NEGATIVE, default=0.0, parse=float)
  # Rotary scaling: 'none' or 'yarn' (YaRN: frequencies between rope_beta_fast and
  # rope_beta_slow rotations over rope_original_len interpolated by rope_factor; cos and sin
  # scaled by rope_attention_factor, 0: 0.1 ln(factor) + 1).
  rope_scaling: str = key('model.rope_scaling', one_of('none', 'yarn'), default='none')
  # YaRN: context extension factor.
  rope_factor: float = key('model.rope_factor', POSITIVE_NUMBER, default=1.0, parse=float)
  # YaRN: the context length the model was trained at.
  rope_original_len: int = key('model.rope_original_len', COUNT, default=0)
  # YaRN: high-frequency boundary (rotations per context).
  rope_beta_fast: float = key('model.rope_beta_fast', POSITIVE_NUMBER, default=32.0, parse=float)
  # YaRN: low-frequency boundary (rotations per context).
  rope_beta_slow: float = key('model.rope_beta_slow', POSITIVE_NUMBER, default=1.0, parse=float)
  # YaRN: round the correction range to whole dimensions.
  rope_truncate: bool = key('model.rope_truncate', default=True, parse=bool)
  # YaRN: attention scale (0: 0.1 ln(factor) + 1).
  rope_attention_factor: float = key('model.rope_attention_factor', NON_NEGATIVE, default=0.0,
                                     parse=float)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def latent(self) -> bool:
    """Multi-head latent attention (DeepSeek)."""
    return self.kv_lora_rank > 0

  @property
  def qk_head_dim(self) -> int:
    """Features per head a query and a key share (MLA: non-rotary and rotary)."""
    return self.head_dim + (self.rope_head_dim if self.latent else 0)

  @property
  def value_head_dim(self) -> int:
    return self.v_head_dim or self.head_dim

  @property
  def softmax_scale(self) -> float:
    """The attention logits' scale: 1/sqrt(qk_head_dim), with YaRN's mscale squared."""
    scale = self.qk_head_dim ** -0.5
    if self.softmax_mscale and self.rope_scaling == 'yarn' and self.rope_factor > 1:
      scale *= (0.1 * self.softmax_mscale * math.log(self.rope_factor) + 1.0) ** 2
    return scale

  def windowed(self, layer: int) -> bool:
    """Whether layer `layer` (block_layer numbering) attends within the sliding window."""
    pattern = self.window_pattern or 'S'
    return self.sliding_window > 0 and pattern[layer % len(pattern)] == 'S'

  def block_layer(self, block):
    """The model's layer index (Hugging Face's numbering) of block `block`'s first layer: the
    dense blocks are layers 0..dense_blocks-1, each block then dense_per_block + 1 layers (its
    MoE layer last), the multi-token-prediction depths the layers after them."""
    return self.dense_blocks + block * (self.dense_per_block + 1)

  @property
  def num_layers(self) -> int:
    """Layers of the model (multi-token-prediction depths not counted)."""
    return self.block_layer(self.num_blocks)

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
  # Tensor (and expert) parallel size.
  tp: int = key('mesh.tp', POSITIVE)
  # Pipeline stages.
  pp: int = key('mesh.pp', POSITIVE)
  dp: int = key('mesh.dp', POSITIVE)   # data parallel: micro-batch sequences split over dp
  # Experts split over dp x tp ("parallel folding") instead of tp (only where dp > 1).
  experts_over_dp: bool = key('mesh.experts_over_dp', parse=bool)
  # Adam moments sharded over dp as well (ZeRO-1).
  shard_optimizer: bool = key('mesh.shard_optimizer', parse=bool)

  @property
  def devices(self) -> int:
    """Devices the mesh needs."""
    return self.dp * self.tp * self.pp

  @classmethod
  def of(cls, tp: int, pp: int = 1, dp: int = 1) -> MeshShape:
    """A mesh of these sizes with nothing folded or sharded over dp."""
    return cls(tp=tp, pp=pp, dp=dp, experts_over_dp=False, shard_optimizer=False)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The pipeline schedule: micro-batches, circular repeats, what the backward recomputes."""
  repeats: int = key('pipeline.repeats', POSITIVE)                   # circular repeats (r)
  num_micro_batches: int = key('data.num_micro_batches', POSITIVE)   # M
  # What the backward pass keeps instead of recomputing (jax.checkpoint policies; the LM head
  # keeps its logits' gradient where the policy keeps matmul outputs).
  remat_policy: str = key('pipeline.remat_policy', one_of(*REMAT_POLICIES))
  # A stage's layers as straight-line code (True) or a lax.scan over them (False: one layer's
  # program, compiles about 2x faster for 8 layers on CPU; XLA copies the stacked weight
  # gradients per micro-batch, 20% of an H200 step).
  unroll_layers: bool = key('pipeline.unroll_layers', default=True, parse=bool)


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """One micro-batch: sequences and their length."""
  micro_batch_size: int = key('data.micro_batch_size', POSITIVE)   # sequences per micro-batch
  # Tokens per sequence (T).
  seq_len: int = key('data.seq_len', POSITIVE)


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
  unroll_layers = property(lambda self: self.schedule.unroll_layers)
  micro_batch_size = property(lambda self: self.batch.micro_batch_size)
  seq_len = property(lambda self: self.batch.seq_len)

  @property
  def global_batch(self) -> int:
    return self.num_micro_batches * self.micro_batch_size

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch * self.seq_len

  devices = property(lambda self: self.mesh.devices)

  @property
  def expert_shards(self) -> int:
    """Devices one MoE layer's experts are split over."""
    return self.tp * (self.dp if self.experts_over_dp else 1)


def _buckets(text) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in str(text).replace(' ', '').split(',') if t)
  except ValueError:
    raise ConfigError(f'data.buckets={text!r}: expected comma-separated sequence lengths, e.g. '
                      f'"128,256,512".') from None


def _profile_steps(text) -> range:
  """'' (none), 'N' or 'FIRST-LAST' -> the steps to trace."""
  text = str(text).strip()
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


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from (the batch shape is the Layout's)."""
  # Tokens: 'random', 'learnable' (synthetic with structure) or 'tokens' (data.path).
  source: str = key('data.source', one_of('random', 'learnable', 'tokens'))
  path: str = key('data.path', parse=str)   # token dataset directory (source='tokens')
  # Rows of whole documents (segment ids, positions) instead of windows.
  pack: bool = key('data.pack', default=False, parse=bool)
  # Row lengths of the steps (tokens per step fixed); () = seq_len.
  buckets: tuple[int, ...] = key('data.buckets', default=(), parse=_buckets)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup, cosine decay to lr * min_lr_ratio, global-norm clipping."""
  # Peak learning rate.
  lr: float = key('optim.lr', POSITIVE_NUMBER, parse=float)
  # Linear warmup steps.
  warmup_steps: int = key('optim.warmup_steps', COUNT)
  decay_steps: int = key('optim.decay_steps', POSITIVE)   # cosine decay length after warmup
  # The cosine decay ends at lr x min_lr_ratio.
  min_lr_ratio: float = key('optim.min_lr_ratio', within(0.0, 1.0 + 1e-9, 'must be in [0, 1]'),
                            parse=float)
  # Adam beta1.
  b1: float = key('optim.b1', UNIT, parse=float)
  # Adam beta2.
  b2: float = key('optim.b2', UNIT, parse=float)
  # AdamW decay of the matrices (never norms, biases or positions).
  weight_decay: float = key('optim.weight_decay', NON_NEGATIVE, parse=float)
  grad_clip: float = key('optim.grad_clip', NON_NEGATIVE, parse=float)   # 0 disables


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long to train, and when to log, save, evaluate and profile."""
  # Train steps in all (a resume continues to it).
  num_steps: int = key('num_steps', POSITIVE)
  # Seed of init, data order and dropout.
  seed: int = key('seed', Rule(_is_int, 'must be an integer'))
  # Steps between console lines and metrics records.
  log_every: int = key('log_every', POSITIVE)
  checkpoint_every: int = key('checkpoint_every', COUNT)   # 0: only at the end
  # Newest complete checkpoints kept.
  checkpoint_keep: int = key('checkpoint_keep', Rule(
      lambda v: _is_int(v) and v >= 1, 'must be >= 1 (the newest checkpoints kept; 0 would '
      'delete every one)'))
  eval_every: int = key('eval_every', COUNT)                # 0: never
  # Evaluation batches per evaluation.
  eval_batches: int = key('eval_batches', COUNT)
  init_from: str = key('init_from', default='', parse=lambda v: str(v or ''))  # params from here
  # Steps to trace with jax.profiler, e.g. '10-12' (written to WORKDIR/profile).
  profile_steps: range = key('profile_steps', default=range(0), parse=_profile_steps)
  hf_dir: str = key('hf_dir', default='', parse=lambda v: str(v or ''))  # config from here
  # Seconds with no step finishing and the loop not moving on before the run ends as stalled
  # (every thread's stack in WORKDIR/process_<i>.stall.log); 0: never.
  stall_timeout_s: float = key('stall_timeout_s', NON_NEGATIVE, default=1800.0, parse=float)


def views() -> tuple[type, ...]:
  """The dataclasses whose fields are the config's keys."""
  return (ModelConfig, MeshShape, Schedule, BatchShape, DataConfig, OptimConfig, RunConfig)


def _fields() -> list[dataclasses.Field]:
  return [f for view in views() for f in dataclasses.fields(view)]


def _read(config: ml_collections.ConfigDict, f: dataclasses.Field):
  """The value of field `f` in `config`: its key's value parsed, or the field's default where the
  key is absent (or None)."""
  path, parse = f.metadata['path'], f.metadata['parse']
  section, _, name = path.rpartition('.')
  holder = config[section] if section else config
  raw = holder[name] if name in holder else None
  if raw is None:
    if f.default is dataclasses.MISSING:
      raise ConfigError(f'Missing config key {path}.')
    return f.default
  return parse(raw) if parse else raw


def _build(cls, config: ml_collections.ConfigDict):
  return cls(**{f.name: _read(config, f) for f in dataclasses.fields(cls)})


def field_errors(config: ml_collections.ConfigDict) -> list[str]:
  """Every key whose value its field's rule refuses (or that cannot be read), named."""
  errors = []
  for f in _fields():
    path, rule = f.metadata['path'], f.metadata['rule']
    section, _, name = path.rpartition('.')
    holder = config[section] if section else config
    try:
      value = _read(config, f)
    except ConfigError as e:
      errors.append(str(e))
      continue
    except (TypeError, ValueError) as e:
      errors.append(f'{path}={holder[name]!r} cannot be read as {f.type} ({e}).')
      continue
    if rule and not rule.ok(value):
      errors.append(f'{path}={holder.get(name, value)!r} {rule.says}.')
  return errors


def known_keys() -> list[str]:
  return sorted(f.metadata['path'] for f in _fields())


def optional_keys() -> set[str]:
  """Keys a config may leave out (their fields' defaults apply)."""
  return {f.metadata['path'] for f in _fields() if f.default is not dataclasses.MISSING}


def default_of(section: str, name: str):
  """The value a config (or a checkpoint's saved config) without section.name means."""
  path = f'{section}.{name}' if section else name
  return next((f.default for f in _fields() if f.metadata['path'] == path
               and f.default is not dataclasses.MISSING), None)


def run_keys() -> set[tuple[str, str]]:
  """(section, name) of the model keys a resume may change (how the same parameters train)."""
  return {tuple(f.metadata['path'].split('.')) for f in _fields() if f.metadata['run']}


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  return _build(ModelConfig, config)


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
  return _build(DataConfig, config)


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  return _build(OptimConfig, config)


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
  return _build(RunConfig, config)


def mesh_shape(config: ml_collections.ConfigDict) -> MeshShape:
  return _build(MeshShape, config)


def layout(config: ml_collections.ConfigDict) -> Layout:
  mesh = mesh_shape(config)
  mesh = dataclasses.replace(mesh, experts_over_dp=mesh.experts_over_dp and mesh.dp > 1)
  return Layout(mesh=mesh, schedule=_build(Schedule, config), batch=_build(BatchShape, config))


def bucket_layouts(config: ml_collections.ConfigDict) -> list[Layout]:
  """The layout of each sequence-length bucket (just the config's without buckets): rows of
  length Tb, micro_batch_size * seq_len / Tb of them per micro-batch."""
  lay = layout(config)
  lengths = data_config(config).buckets
  if not lengths:
    return [lay]
  budget = lay.micro_batch_size * lay.seq_len
  return [dataclasses.replace(lay, batch=BatchShape(max(budget // t, 1), t)) for t in lengths]


def layers_per_stage(model: ModelConfig, lay: Layout) -> int:
  return model.num_blocks // (lay.pp * lay.repeats)


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
