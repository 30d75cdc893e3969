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


GROUPED = 'expert_gemm_grouped'   # calibration key of grouped-matmul kernels (an expert_gemm)


class Kernel(NamedTuple):
  name: str
  cls: str
  runs: int            # executions per program run (loop trip counts)
  flops: int           # matmul FLOPs of one execution
  bytes: int           # operand + result bytes of one execution
  f32: bool            # its matmuls take f32 operands
  grouped: bool = False   # a grouped-matmul kernel (calibrated apart from library GEMMs)

  @property
  def key(self) -> str:
    """Its calibration key: its class, or GROUPED for a grouped matmul."""
    return GROUPED if self.grouped else self.cls


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


_PARAM = re.compile(r'^\s*%(?P<name>[\w.\-]+)\s*=.*?\bparameter\((?P<index>\d+)\)')
_SLICING = {'dynamic-slice', 'slice', 'gather'}


def _parameters(hlo_text: str) -> dict[str, dict[int, str]]:
  """Computation -> parameter index -> the parameter instruction's name."""
  out: dict[str, dict[int, str]] = collections.defaultdict(dict)
  comp = ''
  for line in hlo_text.splitlines():
    header = hlo._HEADER.match(line)
    if header:
      comp = header.group('name')
    elif (m := _PARAM.match(line)):
      out[comp][int(m.group('index'))] = m.group('name')
  return out


def _traffic(module: hlo.Module, params: dict, i: hlo.Instr) -> int:
  """HBM bytes one execution of kernel i reads and writes: an operand read only through slices
  counts the slices, the buffer a dynamic-update-slice writes into in place counts nothing
  read and only the update written."""
  size = lambda name: hlo._nbytes(module.by_name[name].result) if name in module.by_name else 0
  callee = _CALLS.search(i.attrs) if i.op in ('fusion', 'fusion-start') else None
  body = module.by_comp.get(callee.group('name'), []) if callee else []
  if not body:
    if i.op == 'dynamic-update-slice':
      return 2 * size(i.operands[1])
    return hlo._nbytes(i.result) + sum(size(o) for o in i.operands)
  users = collections.defaultdict(list)
  for j in body:
    for k, o in enumerate(j.operands):
      users[o].append((j, k))

  def uses_of(name: str) -> list:   # through bitcasts, which move no data
    out = []
    for j, k in users.get(name, []):
      out.extend(uses_of(j.name) if j.op == 'bitcast' else [(j, k)])
    return out

  read = 0
  for index, operand in enumerate(i.operands):
    uses = uses_of(params[body[0].comp].get(index, ''))
    if uses and all(j.op in _SLICING and k == 0 for j, k in uses):
      read += sum(hlo._nbytes(j.result) for j, _ in uses)
    elif uses and all(j.op == 'dynamic-update-slice' and k == 0 for j, k in uses):
      continue
    else:
      read += size(operand)
  root = body[-1]
  roots = [module.by_name.get(o) for o in root.operands] if root.op == 'tuple' else [root]
  roots = [module.by_name.get(r.operands[0]) if r is not None and r.op == 'bitcast' else r
           for r in roots]
  written = sum(size(r.operands[1]) if r is not None and r.op == 'dynamic-update-slice'
                else hlo._nbytes(r.result) if r is not None else 0 for r in roots)
  return read + written


def kernels(hlo_text: str, row_share: float = 1.0) -> list[Kernel]:
  """Every kernel of a compiled program with its class, executions, FLOPs and bytes."""
  module = hlo.parse(hlo_text)
  params = _parameters(hlo_text)
  fused = _fused(module)
  out = []
  for i in module.instrs:
    if i.comp in fused or i.op in _CONTAINERS or i.op in hlo._NO_WORK:
      continue
    inner = _inner(module, i)
    flops = sum(hlo.instr_flops(module, j, row_share) for j in inner)
    size = 0 if i.op.endswith('-done') else _traffic(module, params, i)
    f32 = any(d == 'f32' for j in inner if j.op == 'dot'
              for o in j.operands[:1] if o in module.by_name
              for d, _ in hlo.arrays(module.by_name[o].result))
    out.append(Kernel(i.name, _classify(module, i, inner, flops), module.count(i), flops, size,
                      f32, any(hlo.grouped_matmul(module, j) is not None for j in inner)))
  return out


def classes(hlo_text: str) -> dict[str, str]:
  """Kernel name -> op class."""
  return {k.name: k.cls for k in kernels(hlo_text)}


def predict(hlo_text: str, rates, calibration: dict[str, float] | None = None,
            row_share: float = 1.0, fine: bool = False) -> dict:
  """Predicted seconds per program run, in all and by op class (collectives excluded: see
  moejax.perf.estimate), and the kernel launches counted; `calibration` multiplies each
  kernel's time by its key's ratio (measured / predicted on a card, moejax.perf.calibration);
  fine: by calibration key (grouped matmuls apart) rather than by class."""
  by_class: dict[str, float] = collections.defaultdict(float)
  launches = 0
  for k in kernels(hlo_text, row_share):
    if k.cls == 'collectives':
      continue
    rate = rates.f32_flops_per_s if k.f32 else rates.bf16_flops_per_s
    seconds = max(k.flops / rate, k.bytes / rates.hbm_bytes_per_s) + LAUNCH_S
    by_class[k.key if fine else k.cls] += seconds * k.runs * (calibration or {}).get(k.key, 1.0)
    launches += k.runs
  return {'predicted_step_s': sum(by_class.values()),
          'predicted_s_by_class': {c: by_class[c] for c in CLASSES + (GROUPED,)
                                   if c in by_class},
          'kernel_launches': launches}


_GEMM_KERNEL = re.compile(r'nvjet|xmma|cutlass|gemm|cublas', re.I)
_GROUPED_KERNEL = re.compile(r'ragged', re.I)   # tokamax's grouped matmul kernels
_ATTENTION_KERNEL = re.compile(r'cudnn|sdpa|fmha|flash', re.I)
_GEMM_CALL = re.compile(r'custom_call_target="__cublas')


def measured_by_class(events: list[dict], hlo_text: str, fine: bool = False
                      ) -> dict[str, float]:
  """Seconds per op class of a traced run of the program. A kernel is matched to its
  instruction by the profiler's `hlo_op`, else by its name (XLA names a fusion's kernel after
  the fusion, '.' written '_'); inside CUDA graphs a library GEMM kernel is the next cuBLAS call
  after the last matched instruction in schedule order, cuDNN's attention kernels are
  attention, tokamax's grouped matmul kernels are expert GEMMs, and copies or memsets are
  'other'. fine: grouped matmuls under GROUPED, apart from the other expert GEMMs."""
  module = hlo.parse(hlo_text)
  cls = {k.name: k.key if fine else k.cls for k in kernels(hlo_text)}
  by_kernel_name = {name.replace('.', '_'): name for name in cls}
  out: dict[str, float] = collections.defaultdict(float)
  last = None
  for e in sorted(events, key=lambda e: float(e.get('ts', 0.0))):
    op, name = e.get('args', {}).get('hlo_op', ''), e.get('name', '')
    matched = op if op in cls else by_kernel_name.get(name)
    if matched is None and _ATTENTION_KERNEL.search(name):
      c = 'attention'
    elif matched is None and _GROUPED_KERNEL.search(name):
      c = GROUPED if fine else 'expert_gemm'
    elif matched is None and _GEMM_KERNEL.search(name) and last is not None:
      after = [i for i in module.by_comp[last.comp][last.pos + 1:] if _GEMM_CALL.search(i.attrs)]
      matched = after[0].name if after else None
      c = cls.get(matched, 'dense_gemm')
    else:
      c = cls.get(matched, 'other')
    if matched in module.by_name:
      last = module.by_name[matched]
    out[c] += float(e.get('dur', 0.0)) * 1e-6
  return dict(out)
