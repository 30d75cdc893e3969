"""Validation loss and perplexity of a checkpoint, on any mesh (default: one device).

  python -m moejax.cli.evaluate --workdir=/tmp/run [--eval_batches=8 --tp=1 --pp=1 --step=-1]

Uses the run's own config from the checkpoint and its evaluation batches (the validation split
of a token dataset; fixed held-out batches of a synthetic source), with moe.eval_capacity_factor.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
flags.DEFINE_integer('eval_batches', 0, 'Batches to average (0: the run\'s eval_batches).')
flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: newest).')
flags.DEFINE_integer('tp', 1, 'Mesh tp.')
flags.DEFINE_integer('pp', 1, 'Mesh pp.')
flags.mark_flags_as_required(['workdir'])


def evaluate(workdir: str, step: int, mesh_shape: tuple[int, int], eval_batches: int) -> dict:
  import jax
  from moejax import config as config_lib
  from moejax.parallel import mesh as mesh_lib
  from moejax.train import loop, optimizer, state as state_lib, step as step_lib
  from moejax.train.checkpoint import Checkpointer, saved_config
  step, c = saved_config(workdir, step)
  c.mesh.tp, c.mesh.pp, c.mesh.dp = mesh_shape[0], mesh_shape[1], 1
  c.pipeline.repeats = 1
  if eval_batches:
    c.eval_batches = eval_batches
  config_lib.validate(c, jax.device_count())
  cfg, lay = config_lib.model_config(c), config_lib.layout(c)
  mesh = mesh_lib.mesh_for(lay)
  tx = optimizer.make(c.optim)
  sh = state_lib.shardings(cfg, lay, tx, mesh)
  state = Checkpointer(workdir, c, cfg, lay, tx, mesh, sh).restore(step)
  run = loop.make_eval(c, cfg, lay, mesh, sh.params, loop.make_source(c),
                       step_lib.batch_sharding(mesh))
  result = run(state.params)
  result.pop('expert_share')
  return dict(step=step, batches=c.eval_batches, **result)


def main(argv):
  del argv
  from moejax import runtime
  from moejax.config import ConfigError
  from moejax.train.checkpoint import saved_config
  f = flags.FLAGS
  try:
    _, config = saved_config(f.workdir, f.step)
    config.mesh.tp, config.mesh.pp, config.mesh.dp = f.tp, f.pp, 1
    runtime.setup_devices(config)
    result = evaluate(f.workdir, f.step, (f.tp, f.pp), f.eval_batches)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  print(f"step {result['step']}: validation loss {result['loss']:.4f} (ce {result['ce']:.4f}), "
        f"perplexity {result['ppl']:.2f}, dropped {100 * result['dropped_frac']:.2f}% over "
        f"{result['batches']} batches", flush=True)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
