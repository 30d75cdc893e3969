"""Turning step metrics into log lines and metrics.jsonl records."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def expert_balance(kept: np.ndarray) -> float:
  """Mean over layers of mean/max tokens per expert (1.0 = perfectly balanced)."""
  kept = np.asarray(kept, np.float64)                      # [NB, E]
  peak = np.maximum(kept.max(axis=-1), 1e-9)
  return float(np.mean(kept.mean(axis=-1) / peak))


def summarise(metrics: dict[str, Any], *, step: int, tokens_per_sec: float) -> dict[str, Any]:
  """Host-side scalars of one step's metrics (after device_get)."""
  kept = np.asarray(metrics['expert_load'])
  out = {'step': step}
  for k in ('loss', 'ce', 'aux_loss', 'z_loss', 'dropped_frac', 'grad_norm', 'lr'):
    if k in metrics:
      out[k] = float(metrics[k])
  out['tokens_per_sec'] = float(tokens_per_sec)
  out['balance'] = expert_balance(kept)
  out['expert_load_min'] = float(kept.min())
  out['expert_load_mean'] = float(kept.mean())
  out['expert_load_max'] = float(kept.max())
  return out


def format_line(record: dict[str, Any], prefix: str = 'step') -> str:
  parts = [f"{prefix} {record['step']:>6d}", f"loss {record['loss']:.4f}"]
  if 'aux_loss' in record:
    parts.append(f"aux {record['aux_loss']:.4f}")
  if 'tokens_per_sec' in record:
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
  parts.append(f"dropped {100 * record['dropped_frac']:.2f}%")
  parts.append(f"balance {record['balance']:.2f}")
  if 'ppl' in record:
    parts.append(f"ppl {record['ppl']:.2f}")
  return ' | '.join(parts)


class MetricsWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')


def check_finite(record: dict[str, Any]) -> None:
  if not math.isfinite(record['loss']):
    raise FloatingPointError(
        f"loss is {record['loss']} at step {record['step']}: stopping. Lower optim.lr, or check "
        f"the data; the last checkpoint is untouched.")
