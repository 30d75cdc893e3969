"""Reading collectives out of a compiled program's HLO text, counted per execution of the step."""
from __future__ import annotations

import collections
import re
from typing import NamedTuple

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1,
          'f64': 8, 's64': 8, 'u64': 8}
# `%name = TYPE[dims]{layout} kind(` or a tuple result `(f32[..], f32[..]) kind-start(`
_LINE = re.compile(r'=\s*(?P<result>\(.*?\)|\S+)\s+(?P<kind>' + '|'.join(KINDS) +
                   r')(?P<start>-start)?\(')
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\{\s*$')
_CALLEE = re.compile(r'\b(?:body|condition|calls|to_apply|true_computation|false_computation)='
                     r'%(?P<name>[\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{(?P<names>[^}]*)\}')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


class Collective(NamedTuple):
  kind: str
  shapes: tuple[tuple[int, ...], ...]   # result array shapes
  bytes: int                            # result bytes (per device, one execution)
  count: int = 1                        # executions per run of the program (loop trip counts)


def _multiplicities(lines: list[str]) -> tuple[dict[str, int], list[str]]:
  """Executions of each computation per program run, and the computation of each line."""
  owner, edges, current, entry = [], collections.defaultdict(list), '', ''
  for line in lines:
    header = _HEADER.match(line)
    if header:
      current = header.group('name')
      entry = current if line.startswith('ENTRY') else entry
    owner.append(current)
    if header or not current:
      continue
    trips = _TRIPS.search(line)
    loop = ' while(' in line
    for m in _CALLEE.finditer(line):
      is_body = loop and line[m.start():].startswith('body=')
      edges[current].append((m.group('name'), int(trips.group('n')) if is_body and trips else 1))
    for m in _BRANCHES.finditer(line):
      for name in m.group('names').split(','):
        edges[current].append((name.strip().lstrip('%'), 1))   # upper bound: every branch
  counts: dict[str, int] = collections.Counter()

  def visit(name: str, times: int, depth: int = 0) -> None:
    counts[name] += times
    if depth < 64:
      for callee, factor in edges.get(name, ()):
        visit(callee, times * factor, depth + 1)
  if entry:
    visit(entry, 1)
  return counts, owner


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective op in the HLO module text (async *-start counted once, *-done skipped)."""
  lines = hlo_text.splitlines()
  counts, owner = _multiplicities(lines)
  out = []
  for line, comp in zip(lines, owner):
    m = _LINE.search(line)
    if not m:
      continue
    shapes, nbytes = [], 0
    for a in _ARRAY.finditer(m.group('result')):
      dims = tuple(int(d) for d in a.group('dims').split(',') if d)
      shapes.append(dims)
      size = 1
      for d in dims:
        size *= d
      nbytes += size * _BYTES.get(a.group('dtype'), 4)
    if m.group('start') and m.group('kind') in ('all-gather', 'collective-permute') and \
        len(shapes) > 1:
      # async start ops return (operand, result[, scratch...]): count the result only
      shapes, nbytes = shapes[1:2], nbytes // 2
    out.append(Collective(m.group('kind'), tuple(shapes), nbytes, counts.get(comp, 1) or 1))
  return out


def bytes_by_kind(hlo_text: str) -> dict[str, int]:
  """Result bytes per device per run of the program, by collective kind (loops multiplied out)."""
  totals = collections.Counter({k: 0 for k in KINDS})
  for c in collectives(hlo_text):
    totals[c.kind] += c.bytes * c.count
  return dict(totals)
