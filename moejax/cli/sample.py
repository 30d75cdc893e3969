"""Generates text from a checkpoint, on any mesh (default: one device).

  python -m moejax.cli.sample --workdir=/tmp/run --prompt="Once upon a time" \
      [--max_new_tokens=200 --temperature=0.8 --top_k=40 --tp=1 --pp=1 --tokenizer=...]

The model config is read from the checkpoint; the tokenizer is the one its token dataset was
prepared with (or --tokenizer: "byte" or a tokenizer.json). By default the prompt fills a KV
cache in one pass and each new token is one step over it (meshes with pp=1, any tp; prompt + new
tokens up to model.max_len); --nocache reruns the model over the fixed context window
(data.seq_len) for every token, on any mesh. Either way the whole generation is one compiled
loop. temperature=0 is greedy; top_k=0 and top_p=1 sample from the whole vocabulary.
"""
from __future__ import annotations

import os
import sys

from absl import flags

flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
flags.DEFINE_string('prompt', '', 'Text to continue.')
flags.DEFINE_integer('max_new_tokens', 100, 'Tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens (0 = all).')
flags.DEFINE_float('top_p', 1.0, 'Sample among the likeliest tokens holding this probability.')
flags.DEFINE_bool('cache', True, 'Generate with a KV cache (meshes with pp=1; with pp>1 the '
                  'windowed sampler runs instead); --nocache re-runs the context window for '
                  'every token on any mesh.')
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: newest).')
flags.DEFINE_integer('tp', 1, 'Mesh tp for sampling.')
flags.DEFINE_integer('pp', 1, 'Mesh pp for sampling (--nocache only; pp samples at once).')
flags.DEFINE_string('tokenizer', '', '"byte" or a tokenizer.json; default: the dataset\'s.')
flags.mark_flags_as_required(['workdir'])


def generate(workdir: str, config, step: int, prompt_ids: list[int], *, max_new_tokens: int,
             sampling, seed: int, cache: bool):
  """Token ids [n, prompt + new] sampled from the checkpoint at `step` (config from
  `run_dir.open_config`, which picks the mesh): one sequence with the cache, pp without."""
  from moejax import generate as gen
  from moejax.cli import run_dir
  c = config.copy_and_resolve_references()
  c.data.update(num_micro_batches=c.mesh.pp, micro_batch_size=1)
  if c.moe.group_size > c.data.seq_len:   # groups of several sequences: one sequence is here
    c.moe.group_size = c.data.seq_len
  if c.data.source == 'tokens' and not os.path.isdir(c.data.path):
    c.data.source, c.data.pack = 'random', False   # the dataset is not needed to sample
  run = run_dir.restore(workdir, c, step)
  if cache and run.plan.layout.pp > 1:
    print(f'pp={run.plan.layout.pp}: the KV cache runs on meshes without pipeline stages; '
          f'sampling by re-running the context window instead (--pp=1 for the cache).',
          file=sys.stderr, flush=True)
    cache = False
  if cache:
    gen.check_cached(run.plan, len(prompt_ids), max_new_tokens)
  return gen.generate(run.plan, run.params, prompt_ids, max_new_tokens, sampling, seed, cache)


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
    from moejax.generate import Sampling
    sampling = Sampling(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
    ids = generate(f.workdir, config, step, tok.encode(f.prompt), max_new_tokens=f.max_new_tokens,
                   sampling=sampling, seed=f.seed, cache=f.cache)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  for row in ids:
    new = [int(i) for i in row[len(tok.encode(f.prompt)):]]
    if tok.eos_id is not None and tok.eos_id in new:
      new = new[:new.index(tok.eos_id)]
    print(f.prompt + tok.decode(new), flush=True)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
