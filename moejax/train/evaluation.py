"""Evaluation: mean metrics over a run's fixed held-out batches."""
from __future__ import annotations

import jax
import numpy as np

from moejax.data.source import Source, global_batch
from moejax.train import metrics as metrics_lib
from moejax.train.plan import Plan


def make_eval(plan: Plan, source: Source):
  """Mean metrics over run.eval_batches fixed batches (steps -1, -2, ...)."""
  eval_step = plan.eval_step()
  batches = [global_batch(source, -1 - i, plan.batch_sharding)
             for i in range(plan.run.eval_batches)]

  def evaluate(params) -> dict:
    results = [jax.device_get(eval_step(params, b)) for b in batches]
    loss = float(np.mean([r['loss'] for r in results]))
    ce = float(np.mean([r['ce'] for r in results]))
    kept = np.sum([r['expert_load'] for r in results], axis=0)
    routed = np.sum([r['expert_assigned'] for r in results], axis=0)
    return {'loss': loss, 'ce': ce, 'ppl': float(np.exp(ce)),
            'dropped_frac': float(np.mean([r['dropped_frac'] for r in results])),
            'balance': metrics_lib.expert_balance(routed),
            'expert_share': metrics_lib.expert_share(kept)}
  return evaluate
