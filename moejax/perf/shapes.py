"""The named shapes the GPU benchmark measures: published widths, blocks reduced to fit one card.

Each is a config of the one model on a 1x1 mesh (bf16 activations, float32 master weights and
Adam), trained as users train it: forward, backward over `num_micro_batches` micro-batches of
`micro_batch_size` rows, one optimizer update.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import NamedTuple

import ml_collections


class Shape(NamedTuple):
  config: str            # config file, relative to the repository root
  variant: str           # its published size
  tiny: str              # its CPU-sized variant (gpu_bench --tiny)
  blocks: int            # blocks kept (the card holds their params and Adam)
  micro_batch_size: int
  seq_len: int


SHAPES = {
    # the seed's pipeline stage: d 1024, 16 heads, 64 experts top-1, d_ff 2048, capacity 1.1
    'seed_stage': Shape('configs/tp4pp4.py', 'full', 'tiny', 2, 8, 1024),
    # OLMoE-1B-7B: d 2048, 64 experts top-8, SwiGLU d_ff 1024, QK-norm
    'olmoe_1b_7b': Shape('configs/olmoe.py', '1b-7b', 'tiny', 4, 2, 4096),
    # Qwen3-30B-A3B: d 2048, 32 q / 4 kv heads, 128 experts top-8, d_ff 768
    'qwen3_30b_a3b': Shape('configs/qwen3_moe.py', '30b-a3b', 'tiny', 4, 2, 4096),
    # Mixtral-8x7B: d 4096, 32 q / 8 kv heads, 8 experts top-2, d_ff 14336
    'mixtral_8x7b': Shape('configs/mixtral.py', '8x7b', 'tiny', 2, 2, 4096),
}
DISPATCHES = ('capacity', 'dropless')


def load(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """get_config(variant) of the config file at `path` (as --config=path:variant loads it;
  run from the repository root, whose configs/ the file imports)."""
  spec = importlib.util.spec_from_file_location('moejax_config_file', path)
  module = importlib.util.module_from_spec(spec)
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  spec.loader.exec_module(module)
  return module.get_config(variant)


def config(name: str, dispatch: str, *, tiny: bool = False,
           num_micro_batches: int = 4) -> ml_collections.ConfigDict:
  """The config of shape `name` with `dispatch` on one device (tiny: its CPU-sized variant,
  2 blocks, 2 rows of 64 tokens)."""
  s = SHAPES[name]
  c = load(s.config, s.tiny if tiny else s.variant)
  c.mesh.update(dp=1, tp=1, pp=1, experts_over_dp=False)
  c.pipeline.repeats = 1
  blocks, rows, seq = (2, 2, 64) if tiny else (s.blocks, s.micro_batch_size, s.seq_len)
  c.model.num_blocks = blocks
  c.model.max_len = max(c.model.max_len, seq)
  c.data.update(source='random', seq_len=seq, micro_batch_size=rows,
                num_micro_batches=num_micro_batches, buckets='', pack=False)
  c.moe.group_size = min(c.moe.group_size, seq)
  c.moe.dispatch = dispatch
  return c
