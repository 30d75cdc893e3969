"""The config reference (docs/config_keys.md), generated from the keys' declarations in
moejax/config.py: each key's field, type, rule, default and the comment written with it.

  python -m moejax.config_reference > docs/config_keys.md

tests/test_config.py fails when the committed page differs from what this prints.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

from moejax import config as config_lib

_KEY = re.compile(r"key\('([\w.]+)'")
_TRAILING = re.compile(r"\)\s{2,}#\s*(.*)$")


def _comments() -> dict[str, str]:
  """Each key's description: the comment lines right above its declaration, then its line's
  own comment."""
  out, block = {}, []
  for line in inspect.getsource(config_lib).splitlines():
    text = line.strip()
    if text.startswith('#'):
      block.append(text.lstrip('# '))
      continue
    match = _KEY.search(text)
    if match:
      trailing = _TRAILING.search(text)
      out[match.group(1)] = ' '.join(block + ([trailing.group(1)] if trailing else []))
    block = []
  return out


def _cell(value) -> str:
  return str(value).replace('|', '\\|').replace('\n', ' ')


def render() -> str:
  """The reference page, one table per config section."""
  comments = _comments()
  rows: dict[str, list[str]] = {}
  for view in config_lib.views():
    for f in dataclasses.fields(view):
      path, rule = f.metadata['path'], f.metadata['rule']
      section = path.rpartition('.')[0] or '(top level)'
      default = ('required' if f.default is dataclasses.MISSING else f'`{f.default!r}`')
      kind = f.type if isinstance(f.type, str) else getattr(f.type, '__name__', str(f.type))
      notes = comments.get(path, '')
      if f.metadata['run']:
        notes += ' (A resume may change it.)'
      rows.setdefault(section, []).append(
          f'| `{path}` | {_cell(kind)} | {_cell(rule.says) if rule else ""} | {default} | '
          f'{_cell(notes.strip())} |')
  out = ['# Config keys', '',
         'Generated from moejax/config.py by `python -m moejax.config_reference` (a test '
         'fails when this page is stale). "required": every config file sets it '
         '(configs/tp4pp4.py, moejax/config_files.py); a default is what a config or a saved '
         'checkpoint without the key means. Rules that relate several keys: '
         'moejax/validation.py.', '']
  for section, lines in rows.items():
    out += [f'## {section}', '', '| key | type | rule | default | what |', '|---|---|---|---|---|',
            *lines, '']
  return '\n'.join(out)


if __name__ == '__main__':
  print(render(), end='')
