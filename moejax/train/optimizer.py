"""AdamW with linear warmup, cosine decay and global-norm clipping."""
from __future__ import annotations

import optax

from moejax.config import OptimConfig


def schedule(optim: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=optim.warmup_steps + optim.decay_steps, end_value=optim.lr * optim.min_lr_ratio)


def make(optim: OptimConfig, decayed) -> optax.GradientTransformation:
  """AdamW decaying the params `decayed` marks (moejax.model.params.decayed: matrices only,
  never norm scales, biases or the position table)."""
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule(optim), b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=decayed))
  return optax.chain(*parts)
