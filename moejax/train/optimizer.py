"""AdamW with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import jax
import optax

from moejax.config import OptimConfig


def schedule(optim: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=optim.warmup_steps + optim.decay_steps, end_value=optim.lr * optim.min_lr_ratio)


def _decay_mask(params):
  """Decay matrices only: not LayerNorm scales/biases, attention or expert biases, positions."""
  def keep(path, _):
    name = getattr(path[-1], 'key', '')
    return name not in ('scale', 'bias', 'bqkv', 'bo', 'b1', 'b2', 'pos', 'select_bias')
  return jax.tree_util.tree_map_with_path(keep, params)


def make(optim: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule(optim), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
