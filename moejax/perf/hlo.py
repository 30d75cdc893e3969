"""Reading a compiled program's HLO text: collectives, executed matmul FLOPs and overlap.

Everything is per device per execution of the program: ops inside while loops count once per
iteration (`known_trip_count`), ops in called computations (fusions, calls) once per call.
Works on XLA:CPU text and on scheduled GPU text, where collectives are `*-start` / `*-done`
pairs: a pair is counted once, at its `-done`, whose result is exactly the collective's result
(a start's result also carries its operands). A ragged-all-to-all writes a slice of a buffer
sized for the worst case: it counts the smaller of its data operand and its result (what a
device sends out, or gets back, when every row it holds travels).
"""
from __future__ import annotations

import collections
import functools
import math
import re
from typing import NamedTuple

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
         'collective-permute')
_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1,
          'f64': 8, 's64': 8, 'u64': 8, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2}
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*[a-z0-9]*)\[(?P<dims>[\d,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*')
_CALLEE = re.compile(r'\b(?:body|condition|calls|to_apply|true_computation|false_computation)='
                     r'%(?P<name>[\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{(?P<names>[^}]*)\}')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_COMMENT = re.compile(r'/\*.*?\*/')
# Ops that do no device work of their own: between a collective's start and done they do not
# make it overlap with anything.
_NO_WORK = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'partition-id',
            'replica-id', 'after-all', 'opt-barrier', 'add-dependency'}


class Instr(NamedTuple):
  name: str
  comp: str            # computation that holds it
  pos: int             # position in that computation (the schedule order on GPU)
  result: str          # result type text, e.g. 'bf16[8,1024]{1,0}' or '(f32[2], u32[])'
  op: str              # opcode, e.g. 'dot', 'fusion', 'all-to-all-done'
  operands: tuple[str, ...]
  attrs: str           # everything after the operand list


class Collective(NamedTuple):
  kind: str
  shapes: tuple[tuple[int, ...], ...]   # result array shapes
  bytes: int                            # result bytes (per device, one execution)
  count: int = 1                        # executions per run of the program (loop trip counts)
  overlapped: bool = False              # async, with device work scheduled between start and done
  groups: tuple[tuple[int, ...], ...] = ()   # partition ids that talk (a permute: its pairs);
                                             # () = every partition in one group


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group that opens at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _parse_instr(line: str, comp: str, pos: int) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = _COMMENT.sub('', line[m.end():])
  end = _balanced(rest, 0) if rest.startswith('(') else rest.find(' ')
  if end <= 0:
    return None
  result, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r'[\w\-$]+', rest)
  if not op or rest[op.end():op.end() + 1] != '(':
    return None
  close = _balanced(rest, op.end())
  operands = tuple(re.findall(r'%([\w.\-]+)', rest[op.end():close]))
  return Instr(m.group('name'), comp, pos, result, op.group(0), operands, rest[close:])


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array in a type text (tuples flattened)."""
  return [(a.group('dtype'), tuple(int(d) for d in a.group('dims').split(',') if d))
          for a in _ARRAY.finditer(type_text)]


def _nbytes(type_text: str) -> int:
  return sum(math.prod(dims) * _BYTES.get(dtype, 4) for dtype, dims in arrays(type_text))


class Module:
  """The instructions of an HLO module and how often each computation runs per execution."""

  def __init__(self, hlo_text: str):
    self.instrs: list[Instr] = []
    edges, current, entry, pos = collections.defaultdict(list), '', '', 0
    for line in hlo_text.splitlines():
      header = _HEADER.match(line)
      if header:
        current, pos = header.group('name'), 0
        entry = current if line.startswith('ENTRY') else entry
        continue
      instr = _parse_instr(line, current, pos) if current else None
      if instr is None:
        continue
      pos += 1
      self.instrs.append(instr)
      trips = _TRIPS.search(instr.attrs)
      for m in _CALLEE.finditer(instr.attrs):
        is_body = instr.op == 'while' and instr.attrs[m.start():].startswith('body=')
        edges[current].append((m.group('name'), int(trips.group('n')) if is_body and trips else 1))
      for m in _BRANCHES.finditer(instr.attrs):
        for name in m.group('names').split(','):
          edges[current].append((name.strip().lstrip('%'), 1))   # upper bound: every branch
    self.by_name = {i.name: i for i in self.instrs}
    self.by_comp: dict[str, list[Instr]] = collections.defaultdict(list)
    for i in self.instrs:
      self.by_comp[i.comp].append(i)
    self.runs: dict[str, int] = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
      self.runs[name] += times
      if depth < 64:
        for callee, factor in edges.get(name, ()):
          visit(callee, times * factor, depth + 1)
    if entry:
      visit(entry, 1)

  def count(self, instr: Instr) -> int:
    return self.runs.get(instr.comp, 1) or 1

  def shape(self, name: str) -> tuple[int, ...]:
    found = arrays(self.by_name[name].result) if name in self.by_name else []
    return found[0][1] if found else ()

  def overlapped(self, done: Instr) -> bool:
    """Whether device work is scheduled between an async op's start and this done."""
    start = self.by_name.get(done.operands[0]) if done.operands else None
    if start is None or start.comp != done.comp:
      return False
    between = self.by_comp[done.comp][start.pos + 1:done.pos]
    return any(i.op not in _NO_WORK and not i.op.endswith(('-start', '-done')) for i in between)


@functools.lru_cache(maxsize=2)
def parse(hlo_text: str) -> Module:
  """The program's Module, parsed once however many analyses read it (the newest two programs
  are kept: a benchmark or a layout search analyses one program at a time). Read-only."""
  return Module(hlo_text)


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective op in the HLO module text (an async pair once, at its -done)."""
  module = parse(hlo_text)
  out = []
  for i in module.instrs:
    kind = i.op[:-len('-done')] if i.op.endswith('-done') else i.op
    if kind not in KINDS:
      continue
    shapes = tuple(dims for _, dims in arrays(i.result))
    is_async = i.op.endswith('-done')
    nbytes = _nbytes(i.result)
    call = (module.by_name.get(i.operands[0]) if is_async and i.operands else i) or i  # start
    if kind == 'ragged-all-to-all':
      data = call.operands[0] if call.operands else None
      if data in module.by_name:
        nbytes = min(nbytes, _nbytes(module.by_name[data].result))
    out.append(Collective(kind, shapes, nbytes, module.count(i),
                          is_async and module.overlapped(i), groups(call.attrs)))
  return out


_IOTA = re.compile(r'replica_groups=\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\]'
                   r'(?:T\((?P<perm>[\d,]+)\))?')
_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")
_LISTED = re.compile(r'(?:replica_groups|source_target_pairs)=\{(?P<body>(?:\{[\d,]*\},?)*)\}')


def groups(attrs: str) -> tuple[tuple[int, ...], ...]:
  """The partition groups of a collective's attributes: listed (`{{0,1},{2,3}}`), in XLA's iota
  form (`[2,2]<=[4]`, `[2,2]<=[2,2]T(1,0)`), over named mesh axes (`mesh['pp'=2,'tp'=2]
  {'tp'}`: partitions numbered row-major over the axes, a group per value of the others), or a
  permute's source-target pairs; () when the collective spans every partition (`{}`)."""
  import numpy as np
  mesh = _MESH.search(attrs)
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group('axes'))
    over = re.findall(r"'([^']+)'", mesh.group('over'))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    ids = np.moveaxis(ids, [names.index(a) for a in over], range(-len(over), 0))
    return tuple(tuple(int(x) for x in g)
                 for g in ids.reshape(-1, math.prod(sizes[names.index(a)] for a in over)))
  iota = _IOTA.search(attrs)
  if iota:
    ints = lambda text: [int(d) for d in text.split(',')]
    ids = np.arange(math.prod(ints(iota.group('dims')))).reshape(ints(iota.group('dims')))
    if iota.group('perm'):
      ids = ids.transpose(ints(iota.group('perm')))
    return tuple(tuple(int(x) for x in g) for g in ids.reshape(ints(iota.group('shape'))))
  listed = _LISTED.search(attrs)
  if not listed:
    return ()
  return tuple(tuple(int(x) for x in g.split(',') if x)
               for g in re.findall(r'\{([\d,]*)\}', listed.group('body')) if g)


def bytes_by_kind(hlo_text: str) -> dict[str, int]:
  """Result bytes per device per run of the program, by collective kind (loops multiplied out)."""
  totals = collections.Counter({k: 0 for k in KINDS})
  for c in collectives(hlo_text):
    totals[c.kind] += c.bytes * c.count
  return dict(totals)


def overlap_fraction(hlo_text: str) -> float:
  """Share of collective bytes whose op is async with device work between start and done."""
  ops = collectives(hlo_text)
  total = sum(c.bytes * c.count for c in ops)
  return sum(c.bytes * c.count for c in ops if c.overlapped) / max(total, 1)


def _dims(attr: str, text: str) -> tuple[int, ...]:
  m = re.search(attr + r'=\{([\d,]*)\}', text)
  return tuple(int(d) for d in m.group(1).split(',') if d) if m else ()


def _json_dims(key: str, text: str) -> tuple[int, ...]:
  m = re.search(r'"' + key + r'":\[([^\]]*)\]', text)
  return tuple(int(d.strip('" ')) for d in m.group(1).split(',') if d.strip('" ')) if m else ()


class GroupedMatmul(NamedTuple):
  """A Pallas-Triton grouped matmul (tokamax's ragged_dot, forward or a gradient): `rows` rows
  of the buffer, each multiplied by one of `groups` [k, n] matrices, in tiles of `block_rows`."""
  rows: int
  k: int
  n: int
  groups: int
  block_rows: int

  def rows_computed(self, row_share: float = 1.0) -> int:
    """Rows the kernel computes when `row_share` of the buffer is routed to it: those rows,
    each group padded to whole tiles, at most the whole buffer."""
    return min(self.rows, math.ceil(row_share * self.rows) + self.groups * (self.block_rows - 1))


def grouped_matmul(module: Module, i: Instr) -> GroupedMatmul | None:
  """The grouped matmul a custom call runs (tokamax's ragged dot: Pallas Triton or Mosaic GPU),
  or None. lhs [m, k] x rhs [G, k, n] -> [m, n], its input gradient [m, n] x [G, k, n] -> [m, k],
  its weight gradient [m, k] x [m, n] -> [G, k, n]: each is 2*k*n per row computed."""
  if (i.op != 'custom-call' or not ('triton' in i.attrs or 'mosaic' in i.attrs)
      or 'RaggedDot' not in i.attrs):
    return None
  out = arrays(i.result)
  lhs = module.shape(i.operands[0]) if i.operands else ()
  rhs = module.shape(i.operands[1]) if len(i.operands) > 1 else ()
  if not out or len(lhs) != 2:
    return None
  result = out[0][1]
  block = re.search(r'block_m\\?"\s*:\s*(\d+)', i.attrs)
  groups = re.search(r'num_groups\\?"\s*:\s*(\d+)', i.attrs)
  k, n = (result[1], result[2]) if len(result) == 3 else (lhs[1], result[1])
  count = (int(groups.group(1)) if groups else result[0] if len(result) == 3
           else rhs[0] if len(rhs) == 3 else 1)
  return GroupedMatmul(lhs[0], k, n, count, int(block.group(1)) if block else 1)


def grouped_matmuls(hlo_text: str) -> list[tuple[GroupedMatmul, int]]:
  """Every grouped matmul of the program with its executions per run."""
  module = parse(hlo_text)
  return [(g, module.count(i)) for i in module.instrs
          if (g := grouped_matmul(module, i)) is not None]


def instr_flops(module: Module, i: Instr, row_share: float = 1.0) -> int:
  """Multiply-add FLOPs (2 per MAC) of one execution of a dot, convolution, GEMM custom call
  (cuBLAS / cuBLASLt), cuDNN fused attention or Triton grouped matmul; 0 for anything else.
  Matmuls inside fusions (Triton GEMMs, XLA:CPU fusions) are dots in the fused computation and
  count there. A grouped matmul computes only the rows routed to it (a share `row_share` of its
  buffer), each group padded to whole tiles: 2*K*N*(share x rows + groups x (tile rows - 1)),
  at most every row of the buffer (row_share=1: the upper bound)."""
  grouped = grouped_matmul(module, i)
  if grouped is not None:
    return 2 * grouped.k * grouped.n * grouped.rows_computed(row_share)
  out = arrays(i.result)
  if not out or not i.operands:
    return 0
  result = out[0][1]
  if i.op == 'dot':
    lhs = module.shape(i.operands[0])
    return 2 * math.prod(result) * math.prod(lhs[d] for d in _dims('lhs_contracting_dims', i.attrs))
  if i.op == 'convolution':
    labels = re.search(r'dim_labels=\w+_(\w+)->', i.attrs)
    rhs = module.shape(i.operands[1])
    out_features = rhs[labels.group(1).index('o')] if labels and 'o' in labels.group(1) else 1
    return 2 * math.prod(result) * math.prod(rhs) // max(out_features, 1)
  if i.op == 'custom-call':
    target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
    target = target.group(1).lower() if target else ''
    if 'gemm' in target or 'matmul' in target:
      lhs = module.shape(i.operands[0])
      contracting = _json_dims('lhs_contracting_dimensions', i.attrs)
      return 2 * math.prod(result) * math.prod(lhs[d] for d in contracting)
    if 'fmha' in target:
      # q [B, T, N, H], k [B, W, N, H]: q k^T and p v, each 2*B*N*T*W*H, half of it under a
      # causal mask (the flash kernel skips the masked tiles); backward twice the forward.
      q, k = module.shape(i.operands[0]), module.shape(i.operands[1])
      if len(q) == 4 and len(k) == 4:
        forward = 4 * q[0] * q[1] * q[2] * q[3] * k[1]
        mask = re.search(r'"mask_type":\s*"(\w+)"', i.attrs)
        if mask and 'CAUSAL' in mask.group(1):
          forward //= 2
        return 2 * forward if 'backward' in target else forward
  return 0


def flops(hlo_text: str, row_share: float = 1.0) -> dict[str, int]:
  """Executed matmul FLOPs per device per run, by part: 'remat' (the blocks' recomputed in the
  backward pass), 'head' (LM head and loss), 'head_remat' (its logits recomputed), 'embed',
  'blocks' (the rest), and 'total'. Grouped matmuls count `row_share` of their buffer rows
  (instr_flops)."""
  module = parse(hlo_text)
  parts = collections.Counter({'blocks': 0, 'head': 0, 'head_remat': 0, 'embed': 0, 'remat': 0})
  for i in module.instrs:
    f = instr_flops(module, i, row_share)
    if not f:
      continue
    name = re.search(r'op_name="([^"]*)"', i.attrs)
    name = name.group(1) if name else ''
    remat = 'rematted_computation' in name
    part = (('head_remat' if remat else 'head') if 'head_loss' in name else 'remat' if remat
            else 'embed' if '/embed' in name or '(embed)' in name else 'blocks')
    parts[part] += f * module.count(i)
  parts['total'] = sum(parts.values())
  return dict(parts)
