"""Validation loss and perplexity of a checkpoint, on any mesh (default: one device).

  python -m moejax.cli.evaluate --workdir=/tmp/run [--eval_batches=8 --tp=1 --pp=1 --step=-1]

Uses the run's own config from the checkpoint and its evaluation batches (the validation split
of a token dataset; fixed held-out batches of a synthetic source), with moe.eval_capacity_factor.
"""
from __future__ import annotations

import json
import sys

from absl import flags

flags.DEFINE_string('workdir', None, 'Run directory (with checkpoints/).')
flags.DEFINE_integer('eval_batches', 0, 'Batches to average (0: the run\'s eval_batches).')
flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: newest).')
flags.DEFINE_integer('tp', 1, 'Mesh tp.')
flags.DEFINE_integer('pp', 1, 'Mesh pp.')
flags.mark_flags_as_required(['workdir'])


def evaluate(workdir: str, config, step: int, eval_batches: int) -> dict:
  """Mean validation metrics of the checkpoint at `step` (config from `run_dir.open_config`)."""
  from moejax.cli import run_dir
  from moejax.train import evaluation, loop
  if eval_batches:
    config.eval_batches = eval_batches
  run = run_dir.restore(workdir, config, step)
  evaluate_fn = evaluation.make_eval(run.plan, loop.make_source(run.plan))
  result = evaluate_fn(run.params)
  result.pop('expert_share')
  return dict(step=step, batches=config.eval_batches, **result)


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  from moejax.cli import run_dir
  from moejax.errors import MoejaxError
  f = flags.FLAGS
  try:
    step, config = run_dir.open_config(f.workdir, f.step, f.tp, f.pp)
    result = evaluate(f.workdir, config, step, f.eval_batches)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  print(f"step {result['step']}: validation loss {result['loss']:.4f} (ce {result['ce']:.4f}), "
        f"perplexity {result['ppl']:.2f}, dropped {100 * result['dropped_frac']:.2f}% over "
        f"{result['batches']} batches", flush=True)
  print(json.dumps(result))


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
