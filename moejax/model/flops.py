"""The model's training FLOPs per token, derived from the parameter declarations.

Counted as PaLM's appendix B counts them: 6 FLOPs (forward 2, backward 4) per active matmul
weight per token, plus attention's score and value matmuls. A matmul weight is a block's or the
head's parameter whose declaration makes it a 'matrix' (moejax.model.params.role: q/k/v, output
projection, router, expert matrices, LM head): norm scales and biases are not matmuls, and the
token embedding is a lookup. An expert matrix is active for top_k of its num_experts experts.
Attention is causal: a token attends to T/2 positions on average over a sequence of T, so its
score (Q K^T) and value (P V) matmuls cost 2 x 2 x N x H x T/2 forward, 6 x N x H x T to train;
in a block with a sliding window W < T, to W - W^2 / 2T positions on average (the same
continuous count), 12 x N x H x (W - W^2 / 2T) to train. With keys and values of different
widths (MLA: H + Hr, Hv), H above is their mean.
"""
from __future__ import annotations

import functools
import math

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from moejax.config import ModelConfig


@functools.lru_cache(maxsize=64)
def _matmul_macs(cfg: ModelConfig) -> dict[str, float]:
  """Multiply-accumulates per token of one block's matmul weights, of its routed experts'
  alone, of the head's, of a dense block's and of a multi-token-prediction depth's."""
  import flax.linen as nn
  from moejax.model import params as params_lib
  boxed = params_lib.template(cfg)
  specs = nn.get_partition_spec(boxed)
  shapes = nn.unbox(boxed)
  out = {'experts': 0.0, 'dense_block': 0.0, 'mtp': 0.0}
  for part in ('block', 'head', 'dense_block', 'mtp'):
    if part not in specs:
      continue
    total = 0.0
    for spec, leaf in zip(jax.tree.leaves(specs[part], is_leaf=lambda s: isinstance(s, P)),
                          jax.tree.leaves(shapes[part])):
      axes = tuple(spec)
      if params_lib.role(axes) != 'matrix':
        continue
      size = math.prod(leaf.shape)
      if 'experts' in axes:
        size = size * cfg.top_k / cfg.num_experts
        out['experts'] += size if part == 'block' else 0.0
      total += size
    out[part] = total
  return out


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, layer: int = 0) -> float:
  """Training FLOPs per token of layer `layer`'s causal score and value matmuls."""
  keys = seq_len / 2                                                    # on average
  w = cfg.sliding_window
  if cfg.windowed(layer) and w < seq_len:
    keys = w - w * w / (2 * seq_len)
  return 6 * cfg.num_heads * (cfg.qk_head_dim + cfg.value_head_dim) * keys


def block_flops(cfg: ModelConfig, seq_len: int, block: int = 0) -> float:
  """Training FLOPs per token of block `block` (its own dense blocks included, with
  model.dense_per_block): 6 x its active matmul weights + each of its layers' attention."""
  first = cfg.block_layer(block)
  return 6 * _matmul_macs(cfg)['block'] + sum(
      attention_flops_per_token(cfg, seq_len, layer)
      for layer in range(first, first + cfg.dense_per_block + 1))


def expert_flops(cfg: ModelConfig) -> float:
  """Training FLOPs per token of one block's routed experts (top_k of them)."""
  return 6 * _matmul_macs(cfg)['experts']


def model_flops(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the whole model (every dense block, every block and the LM
  head; with multi-token prediction each depth's projection, block and head again)."""
  macs = _matmul_macs(cfg)
  dense = sum(6 * macs['dense_block'] + attention_flops_per_token(cfg, seq_len, b)
              for b in range(cfg.dense_blocks))
  first_mtp = cfg.num_layers
  mtp = sum(6 * (macs['mtp'] + macs['head']) + attention_flops_per_token(cfg, seq_len, b)
            for b in range(first_mtp, first_mtp + cfg.mtp_depth))
  return (dense + sum(block_flops(cfg, seq_len, b) for b in range(cfg.num_blocks))
          + 6 * macs['head'] + mtp)


def block_flops_per_token(config: ml_collections.ConfigDict) -> float:
  """block_flops of a ConfigDict (its model keys and data.seq_len)."""
  from moejax import config as config_lib
  return block_flops(config_lib.model_config(config), config.data.seq_len)


def flops_per_token(config: ml_collections.ConfigDict) -> float:
  """model_flops of a ConfigDict (its model keys and data.seq_len)."""
  from moejax import config as config_lib
  return model_flops(config_lib.model_config(config), config.data.seq_len)
