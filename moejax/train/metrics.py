"""Turning step metrics into log lines, metrics.jsonl records and TensorBoard scalars."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import numpy as np

from moejax.errors import ConfigError


def expert_balance(load: np.ndarray) -> float:
  """Mean over layers of mean/max tokens per expert (1.0 = perfectly balanced); load [NB, E]:
  the router's assignments per expert (before capacity drops)."""
  load = np.asarray(load, np.float64)                      # [NB, E]
  peak = np.maximum(load.max(axis=-1), 1e-9)
  return float(np.mean(load.mean(axis=-1) / peak))


def summarise(metrics: dict[str, Any], *, step: int, tokens_per_sec: float) -> dict[str, Any]:
  """Host-side scalars of one step's metrics (after device_get)."""
  kept = np.asarray(metrics['expert_load'])
  out = {'step': step}
  for k in ('loss', 'ce', 'mtp_ce', 'aux_loss', 'z_loss', 'dropped_frac', 'rerouted_frac',
            'grad_norm', 'lr'):
    if k in metrics:
      out[k] = float(metrics[k])
  out['tokens_per_sec'] = float(tokens_per_sec)
  routed = np.asarray(metrics.get('expert_assigned', kept))          # [NB, E] before drops
  out['balance'] = expert_balance(routed)
  out['expert_load_min'] = float(kept.min())
  out['expert_load_mean'] = float(kept.mean())
  out['expert_load_max'] = float(kept.max())
  out['expert_share'] = expert_share(kept)
  if 'expert_assigned' in metrics:
    assigned = np.asarray(metrics['expert_assigned'], np.float64)    # [NB, E]
    out['dropped_frac_per_layer'] = [
        float(x) for x in 1.0 - kept.sum(-1) / np.maximum(assigned.sum(-1), 1e-9)]
  out['balance_per_layer'] = [expert_balance(a[None]) for a in routed]
  return out


def expert_share(kept: np.ndarray) -> list[list[float]]:
  """Share of each layer's kept tokens per expert, [layers][experts] (for plots)."""
  kept = np.asarray(kept, np.float64)
  return np.round(kept / np.maximum(kept.sum(axis=-1, keepdims=True), 1e-9), 5).tolist()


def format_line(record: dict[str, Any], prefix: str = 'step', total: int | None = None) -> str:
  step = f"{prefix} {record['step']:>6d}" + (f'/{total}' if total else '')
  parts = [step, f"loss {record['loss']:.4f}"]
  if 'aux_loss' in record:
    parts.append(f"aux {record['aux_loss']:.4f}")
  if 'seq_len' in record:
    parts.append(f"T={record['seq_len']}")
  if 'tokens_per_sec' in record:
    parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
  if 'seconds_left' in record:
    parts.append(f"{_duration(record['seconds_left'])} left")
  parts.append(f"dropped {100 * record['dropped_frac']:.2f}%")
  parts.append(f"balance {record['balance']:.2f}")
  if record.get('rerouted_frac', 0.0) > 0.0:
    parts.append(f"rerouted {100 * record['rerouted_frac']:.1f}%")
  if 'ppl' in record:
    parts.append(f"ppl {record['ppl']:.2f}")
  return ' | '.join(parts)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f'{h}h{rest // 60:02d}m' if h else f'{rest // 60}m{rest % 60:02d}s'


@contextlib.contextmanager
def _writing(path: str):
  """Turns a failed metrics write (read-only or full disk) into one clear error."""
  try:
    yield
  except OSError as e:
    raise ConfigError(f'Cannot write metrics under {path}: {e.strerror or e}. Use a writable '
                      f'--workdir with free space.') from e


class MetricsWriter:
  """Appends records to <workdir>/metrics.jsonl and writes their scalars as TensorBoard events
  under <workdir>/tensorboard (loss, eval loss, lr, grad norm, aux/z losses, dropped fraction,
  and per layer the max/mean expert load)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self._events = None
    if enabled:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      with _writing(workdir):
        self._events = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with _writing(self.path):
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      self._scalars(record)

  def _scalars(self, record: dict[str, Any]) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    values = {k: v for k, v in record.items()
              if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v)}
    for layer, share in enumerate(record.get('expert_share', ())):
      values[f'expert_load_max_over_mean/layer_{layer}'] = max(share) * len(share)
    for key in ('dropped_frac_per_layer', 'balance_per_layer'):
      for layer, v in enumerate(record.get(key, ())):
        values[f'{key.removesuffix("_per_layer")}/layer_{layer}'] = v
    for layer, share in enumerate(record.get('eval_expert_share', ())):
      values[f'eval_expert_load_max_over_mean/layer_{layer}'] = max(share) * len(share)
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(record['step']),
                                           summary=summary))
    self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
