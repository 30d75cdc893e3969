"""Which kernel runs each part of the step that has several, decided here alone, per platform
and config: attention (cuDNN's fused kernel or XLA's), the dropless experts' grouped matmul
(tokamax's Mosaic GPU kernel or XLA's ragged_dot) and the ragged exchange (XLA's
ragged-all-to-all or a padded all_to_all). `choose` gathers the three and says the compile line.
The third-party kernel is called behind one adapter, moejax.model.grouped_matmul (tokamax's
public API); cuDNN's through jax.nn.dot_product_attention.
"""
from __future__ import annotations

import importlib.util
from typing import NamedTuple

import jax

from moejax.config import ModelConfig
from moejax.errors import ConfigError

NVIDIA_PLATFORMS = ('cuda', 'gpu')           # platform names of NVIDIA GPU devices
RAGGED_PLATFORMS = ('cuda', 'gpu', 'rocm')   # backends that implement ragged-all-to-all
CUDNN_DTYPES = ('bfloat16', 'float16')


def attention(cfg: ModelConfig, platform: str, packed: bool) -> tuple[str, str]:
  """The training attention kernel, 'cudnn' (cuDNN's fused flash attention: no [T, T] scores
  stored, the masked causal half skipped) or 'xla', and why, for cfg.attention on devices of
  `platform` with rows of packed documents or not. A ConfigError where 'cudnn' is asked for
  and cannot apply. Cached decoding always uses XLA's."""
  if cfg.attention == 'xla':
    return 'xla', 'XLA attention (model.attention=xla)'
  if cfg.attention == 'auto' and platform not in NVIDIA_PLATFORMS:
    return 'xla', 'XLA attention'
  cannot = [why for why, fails in (
      (f'the devices are {platform}, not NVIDIA GPUs', platform not in NVIDIA_PLATFORMS),
      (f'model.dtype={cfg.dtype} (cuDNN computes in bfloat16 or float16)',
       cfg.dtype not in CUDNN_DTYPES),
      (f'model.head_dim={cfg.head_dim} (cuDNN: a multiple of 8, at most 128)',
       cfg.head_dim % 8 or cfg.head_dim > 128),
      ('packed documents (data.pack) need a per-document mask that cuDNN\'s fused attention '
       'does not take', packed),
      ('attention sinks (model.attn_sinks) are a logit cuDNN\'s fused attention does not take',
       cfg.attn_sinks),
      ('a sliding window (model.sliding_window) set per block', cfg.sliding_window > 0),
      ('multi-head latent attention\'s values are narrower than its keys', cfg.latent),
  ) if fails]
  if not cannot:
    return 'cudnn', 'cuDNN fused attention'
  if cfg.attention == 'cudnn':
    raise ConfigError(f'model.attention=cudnn cannot apply: {"; ".join(cannot)}. Use '
                      f'model.attention=auto (cuDNN where it applies) or xla.')
  return 'xla', f'XLA attention ({"; ".join(cannot)})'


def grouped_matmul(platform: str) -> tuple[str, str]:
  """The grouped matmul of ragged expert rows, 'mosaic' (tokamax's Mosaic GPU kernel) or 'xla'
  (jax.lax.ragged_dot), and why, for devices of `platform`. Named here, not left to tokamax:
  its own choice looks at the default backend, the CPU during an ahead-of-time GPU compile."""
  if platform not in NVIDIA_PLATFORMS:
    return 'xla', 'XLA ragged_dot'
  if importlib.util.find_spec('tokamax') is None:
    return 'xla', ('XLA ragged_dot, a dense matmul on NVIDIA GPUs: pip install -r '
                   'requirements-cuda12.txt for tokamax\'s grouped matmul')
  if jax.default_backend() not in NVIDIA_PLATFORMS:
    # tokamax 0.0.17's Mosaic kernel picks its tiles from the GPU it runs on: none is here.
    return 'xla', ('XLA ragged_dot (an ahead-of-time compile: tokamax\'s Mosaic GPU kernel, '
                   'what a GPU runs, reads the card it runs on)')
  return 'mosaic', 'tokamax Mosaic GPU grouped matmul'


def exchange(platform: str) -> str:
  """The ragged exchange of expert rows: 'ragged' (jax.lax.ragged_all_to_all) or 'padded' (a
  dense all_to_all of worst-case buffers; XLA:CPU has no ragged-all-to-all)."""
  return 'ragged' if platform in RAGGED_PLATFORMS else 'padded'


class Kernels(NamedTuple):
  attention: str        # 'cudnn' or 'xla'
  grouped_matmul: str   # 'mosaic' or 'xla'
  exchange: str         # 'ragged' or 'padded'
  line: str             # what the compile line says of them


def choose(cfg: ModelConfig, platform: str, packed: bool, rows: bool) -> Kernels:
  """Every kernel choice of a model on devices of `platform`; rows: whether the experts' tokens
  travel as ragged rows (moejax.model.dispatch.sends_rows) rather than fixed buffers."""
  att, att_why = attention(cfg, platform, packed)
  matmul, matmul_why = grouped_matmul(platform)
  ex = exchange(platform)
  experts = (f'{cfg.dispatch} experts by ragged rows ({ex} all-to-all, {matmul_why})' if rows
             else f'{cfg.dispatch} experts in fixed buffers')
  return Kernels(att, matmul, ex, f'{experts}, {att_why}')
