"""Generates text from a checkpoint, on any mesh (default: one device).

  python -m moejax.cli.sample --workdir=/tmp/run --prompt="Once upon a time" \
      [--max_new_tokens=200 --temperature=0.8 --top_k=40 --tp=1 --pp=1 --tokenizer=...]

The model config is read from the checkpoint; the tokenizer is the one its token dataset was
prepared with (or --tokenizer: "byte" or a tokenizer.json). Without a KV cache every new token
reruns the model over the fixed context window (data.seq_len); the whole generation is one
compiled loop. temperature=0 is greedy; top_k=0 samples from the whole vocabulary.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
flags.DEFINE_string('prompt', '', 'Text to continue.')
flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all).')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: newest).')
flags.DEFINE_integer('tp', 1, 'Mesh tp for sampling.')
flags.DEFINE_integer('pp', 1, 'Mesh pp for sampling (pp samples are drawn at once).')
flags.DEFINE_string('tokenizer', '', '"byte" or a tokenizer.json; default: the dataset\'s.')
flags.mark_flags_as_required(['workdir'])


def generate(workdir: str, config, step: int, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float, top_k: int, seed: int):
  """Token ids [pp, prompt + new] sampled from the checkpoint at `step` (config from
  `run_dir.open_config`, which picks the mesh)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax.cli import run_dir
  from moejax.config import ConfigError
  from moejax.model import transformer
  c = config.copy_and_resolve_references()
  c.data.update(num_micro_batches=c.mesh.pp, micro_batch_size=1)
  if c.data.source == 'tokens' and not os.path.isdir(c.data.path):
    c.data.source = 'random'          # the dataset is not needed to sample
  window = c.data.seq_len
  if not prompt_ids:
    raise ConfigError('The prompt is empty; pass --prompt="some text".')
  if len(prompt_ids) + max_new_tokens > window:
    raise ConfigError(f'prompt ({len(prompt_ids)} tokens) + --max_new_tokens={max_new_tokens} '
                      f'exceeds the context window data.seq_len={window}; shorten them.')
  run = run_dir.restore(workdir, c, step)
  plan = run.plan
  cfg, lay = plan.model, plan.layout
  m = lay.num_micro_batches
  buf = np.zeros((m, 1, window), np.int32)
  buf[:, 0, :len(prompt_ids)] = prompt_ids

  def sample(params, tokens, key):
    def body(i, carry):
      tokens, key = carry
      pos = len(prompt_ids) - 1 + i
      logits = transformer.next_token_logits(params, tokens, pos, cfg=cfg, lay=lay)  # [M, 1, V]
      key, sub = jax.random.split(key)
      if temperature <= 0:
        nxt = jnp.argmax(logits, axis=-1)
      else:
        logits = logits / temperature
        if top_k > 0:
          kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
          logits = jnp.where(logits < kth, -1e30, logits)
        nxt = jax.random.categorical(sub, logits, axis=-1)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(jnp.int32), pos + 1, 2)
      return tokens, key
    return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, key))[0]

  out = plan.jit(sample)(run.params, jax.device_put(buf, plan.batch_sharding),
                         jax.random.key(seed))
  return np.asarray(jax.device_get(out))[:, 0, :len(prompt_ids) + max_new_tokens]


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  f = flags.FLAGS
  from moejax.cli import run_dir
  from moejax.errors import MoejaxError
  from moejax.data import tokenizer as tokenizer_lib
  try:
    step, config = run_dir.open_config(f.workdir, f.step, f.tp, f.pp)
    tok = tokenizer_lib.for_model(config, f.tokenizer)
    ids = generate(f.workdir, config, step, tok.encode(f.prompt), max_new_tokens=f.max_new_tokens,
                   temperature=f.temperature, top_k=f.top_k, seed=f.seed)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  for row in ids:
    new = [int(i) for i in row[len(tok.encode(f.prompt)):]]
    if tok.eos_id is not None and tok.eos_id in new:
      new = new[:new.index(tok.eos_id)]
    print(f.prompt + tok.decode(new), flush=True)


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == '__main__':
  run()
