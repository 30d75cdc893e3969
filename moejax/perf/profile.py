"""Where a compiled step spends its time on a device, read from a profiler trace of one step.

The trace is JAX's Perfetto export (`jax.profiler.trace(..., create_perfetto_trace=True)`):
every device kernel is one complete event ('ph': 'X') on a device process, named by its kernel
and, where the profiler knows it, carrying the HLO instruction it ran for (`args.hlo_op`).
moejax.perf.opclass gives each kernel its op class.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def trace_file(log_dir: str) -> str | None:
  """The newest Perfetto trace under `log_dir` (None when the profiler wrote none)."""
  found = glob.glob(os.path.join(log_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  return max(found, key=os.path.getmtime) if found else None


def device_events(path: str, module: str = 'train_step') -> list[dict]:
  """Complete events of the kernels of programs named like `module`: those of device
  processes (NVIDIA: '/device:GPU:n'), or, where there are none (XLA:CPU runs its kernels on
  host threads), every event naming an HLO instruction."""
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device = {pid for pid, name in names.items() if '/device:' in name}
  ops = [e for e in events if e.get('ph') == 'X' and e.get('args', {}).get('hlo_op')
         and module in e['args'].get('hlo_module', '')]
  on_device = [e for e in ops if e.get('pid') in device]
  return on_device or ops


def kernel_seconds(events: list[dict]) -> dict[str, dict]:
  """Per HLO instruction (or kernel name where none is given): total seconds and launches."""
  out: dict[str, dict] = collections.defaultdict(lambda: {'s': 0.0, 'n': 0, 'kernels': set()})
  for e in events:
    args = e.get('args', {})
    op = args.get('hlo_op') or e.get('name', '?')
    row = out[op]
    row['s'] += float(e.get('dur', 0.0)) * 1e-6
    row['n'] += 1
    if len(row['kernels']) < 3:
      row['kernels'].add(e.get('name', '?'))
  return {op: {'s': r['s'], 'n': r['n'], 'kernels': sorted(r['kernels'])} for op, r in out.items()}


def busy_seconds(events: list[dict]) -> float:
  """Seconds in which at least one device kernel ran (overlapping kernels counted once)."""
  spans = sorted((float(e['ts']), float(e['ts']) + float(e.get('dur', 0.0))) for e in events)
  busy, end = 0.0, float('-inf')
  for start, stop in spans:
    if stop <= end:
      continue
    busy += stop - max(start, end)
    end = stop
  return busy * 1e-6
