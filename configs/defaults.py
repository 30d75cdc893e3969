"""Shared helpers for config files (plain functions; configs call what they need)."""
import ml_collections


def run_keys(config: ml_collections.ConfigDict, *, num_steps: int, log_every: int,
             checkpoint_every: int) -> None:
  """The run-control keys every config has (the public interface keeps these names)."""
  config.num_steps = num_steps              # optimizer steps to train (resume continues to this)
  config.seed = 0                           # params, data and dropout are functions of seed and step
  config.log_every = log_every              # console line + metrics.jsonl record every N steps
  config.checkpoint_every = checkpoint_every  # save every N steps (0: only at the end)
  config.checkpoint_keep = 3                # newest checkpoints kept
  config.eval_every = 0                     # evaluate every N steps (0: never)
  config.eval_batches = 2                   # fixed evaluation batches (steps -1, -2, ... of the source)
  config.init_from = ''                     # checkpoint dir to load params from (fine-tuning)
  config.profile_steps = ''                 # 'N' or 'FIRST-LAST': jax.profiler trace of those steps


def adamw(lr: float, *, warmup_steps: int, decay_steps: int) -> ml_collections.ConfigDict:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""
  return ml_collections.ConfigDict(dict(
      lr=lr,                      # peak learning rate
      warmup_steps=warmup_steps,  # linear warmup from 0
      decay_steps=decay_steps,    # cosine decay length after warmup (to min_lr_ratio * lr)
      min_lr_ratio=0.1,           # final lr / peak lr
      b1=0.9,                     # Adam beta1
      b2=0.95,                    # Adam beta2
      weight_decay=0.1,           # decoupled decay on matrices (not norms or biases)
      grad_clip=1.0,              # global-norm clip (0 disables)
  ))
