"""Reading collectives out of a compiled program's HLO text."""
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


class Collective(NamedTuple):
  kind: str
  shapes: tuple[tuple[int, ...], ...]   # result array shapes
  bytes: int                            # result bytes (per device)


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective op in the HLO module text (async *-start counted once, *-done skipped)."""
  out = []
  for line in hlo_text.splitlines():
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
    out.append(Collective(m.group('kind'), tuple(shapes), nbytes))
  return out


def bytes_by_kind(hlo_text: str) -> dict[str, int]:
  """Result bytes per device per collective kind (a program's collectives, each counted once)."""
  totals = collections.Counter({k: 0 for k in KINDS})
  for c in collectives(hlo_text):
    totals[c.kind] += c.bytes
  return dict(totals)
