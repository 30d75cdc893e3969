"""A compiled program's kernels, each given an op class and a predicted time on a card.

A kernel is an instruction of a computation that runs as a program step (the entry, a loop's
body, a called computation), not one fused into another. Its class comes from what it computes
and the name scope it was traced under (moejax's 'attention', 'moe', 'expert_matmul',
'optimizer', 'head_loss' scopes). Its predicted time is the larger of its matmul FLOPs at the
card's rate (bf16, or f32 where its operands are f32) and its bytes (operands + results) at
HBM bandwidth, plus a launch cost; loops count their trip counts. Collectives are left to
moejax.perf.estimate (their time depends on links, not HBM).
"""
from __future__ import annotations

import collections
import re
from typing import NamedTuple

from moejax.perf import hlo

CLASSES = ('attention', 'expert_gemm', 'dense_gemm', 'routing', 'elementwise', 'optimizer',
           'collectives', 'other')
# Kernel launch and tail cost per kernel (s): a lower bound for tiny kernels.
LAUNCH_S = 4e-6
_CONTAINERS = {'while', 'call', 'conditional'}
_ROUTING_OPS = {'sort', 'scatter', 'gather', 'iota', 'reduce-window', 'select-and-scatter'}
_CALLS = re.compile(r'\bcalls=%(?P<name>[\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Kernel(NamedTuple):
  name: str
  cls: str
  runs: int            # executions per program run (loop trip counts)
  flops: int           # matmul FLOPs of one execution
  bytes: int           # operand + result bytes of one execution
  f32: bool            # its matmuls take f32 operands


def _fused(module: hlo.Module) -> set[str]:
  """Computations that are the bodies of fusions or reducers (not kernels of their own)."""
  out = set()
  for i in module.instrs:
    if i.op not in _CONTAINERS:
      out.update(m.group('name') for m in _CALLS.finditer(i.attrs))
    out.update(m.group(1) for m in re.finditer(r'\bto_apply=%([\w.\-]+)', i.attrs))
  return out


def _inner(module: hlo.Module, i: hlo.Instr) -> list[hlo.Instr]:
  """i and every instruction of the computations it fuses (recursively)."""
  out, todo = [i], [m.group('name') for m in _CALLS.finditer(i.attrs)]
  seen = set()
  while todo:
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for j in module.by_comp.get(comp, ()):
      out.append(j)
      todo.extend(m.group('name') for m in _CALLS.finditer(j.attrs))
  return out


def _classify(module: hlo.Module, i: hlo.Instr, inner: list[hlo.Instr], flops: int) -> str:
  ops = {j.op for j in inner}
  names = ' '.join(m.group(1) for j in inner for m in _OP_NAME.finditer(j.attrs))
  base = i.op.removesuffix('-start').removesuffix('-done')
  if base in hlo.KINDS:
    return 'collectives'
  if 'optimizer' in names:
    return 'optimizer'
  if 'fmha' in i.attrs.lower() or 'dot_product_attention' in names:
    return 'attention'
  if hlo.grouped_matmul(module, i) is not None or (flops and 'expert_matmul' in names):
    return 'expert_gemm'
  if flops:
    return 'dense_gemm'
  if '/moe' in names and (ops & _ROUTING_OPS or 'moe_' in names):
    return 'routing'
  if ops - {'parameter', 'bitcast', 'copy', 'transpose', 'constant', 'tuple',
            'get-tuple-element', 'dynamic-slice', 'dynamic-update-slice', 'slice',
            'concatenate', 'reshape', 'broadcast'}:
    return 'elementwise'
  return 'other'


def kernels(hlo_text: str, row_share: float = 1.0) -> list[Kernel]:
  """Every kernel of a compiled program with its class, executions, FLOPs and bytes."""
  module = hlo.Module(hlo_text)
  fused = _fused(module)
  out = []
  for i in module.instrs:
    if i.comp in fused or i.op in _CONTAINERS or i.op in hlo._NO_WORK:
      continue
    inner = _inner(module, i)
    flops = sum(hlo.instr_flops(module, j, row_share) for j in inner)
    size = hlo._nbytes(i.result) + sum(
        hlo._nbytes(module.by_name[o].result) for o in i.operands if o in module.by_name)
    if i.op.endswith('-done'):
      size = 0
    f32 = any(d == 'f32' for j in inner if j.op == 'dot'
              for o in j.operands[:1] if o in module.by_name
              for d, _ in hlo.arrays(module.by_name[o].result))
    out.append(Kernel(i.name, _classify(module, i, inner, flops), module.count(i), flops, size,
                      f32))
  return out


def classes(hlo_text: str) -> dict[str, str]:
  """Kernel name -> op class."""
  return {k.name: k.cls for k in kernels(hlo_text)}


def predict(hlo_text: str, rates, calibration: dict[str, float] | None = None,
            row_share: float = 1.0) -> dict:
  """Predicted seconds per program run, in all and by op class (collectives excluded: see
  moejax.perf.estimate), and the kernel launches counted; `calibration` multiplies each
  class's time (measured / predicted on a card, moejax.perf.calibration)."""
  by_class: dict[str, float] = collections.defaultdict(float)
  launches = 0
  for k in kernels(hlo_text, row_share):
    if k.cls == 'collectives':
      continue
    rate = rates.f32_flops_per_s if k.f32 else rates.bf16_flops_per_s
    seconds = max(k.flops / rate, k.bytes / rates.hbm_bytes_per_s) + LAUNCH_S
    by_class[k.cls] += seconds * k.runs
    launches += k.runs
  if calibration:
    by_class = {c: s * calibration.get(c, 1.0) for c, s in by_class.items()}
  return {'predicted_step_s': sum(by_class.values()),
          'predicted_s_by_class': {c: by_class.get(c, 0.0) for c in CLASSES if c in by_class},
          'kernel_launches': launches}
