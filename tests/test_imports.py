"""Layers depend one way: packages on floors, parallel/ never imports model/, and no module
imports itself back."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'moejax')


def imports() -> dict[str, set[str]]:
  """moejax module -> moejax modules it imports (anywhere in the file)."""
  graph = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
      module = module.removesuffix('.__init__')
      found = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('moejax'):
          found.update(f'{node.module}.{a.name}' for a in node.names)
          found.add(node.module)
        elif isinstance(node, ast.Import):
          found.update(a.name for a in node.names if a.name.startswith('moejax'))
      graph[module] = found
  return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_parallel_imports_nothing_from_model():
  for module, deps in imports().items():
    if module.startswith('moejax.parallel'):
      assert not [d for d in deps if d.startswith('moejax.model')], (module, deps)


FLOORS = [   # lowest first; a package imports from its own floor or below
    {'config', 'errors', 'kernels', 'precision', 'rng', 'runtime', 'checkpoint_dir', 'targets'},
    {'model', 'parallel', 'data', 'convert', 'generate', 'validation'},
    {'train'},
    {'perf'},
    {'cli', 'bench', 'config_files', 'config_reference'},
]


def _package(module: str) -> str:
  return module.split('.')[1] if '.' in module else module


def package_imports() -> dict[str, set[str]]:
  """moejax package (or top-level module) -> the other packages it imports from."""
  graph: dict[str, set[str]] = {}
  for module, deps in imports().items():
    if module != 'moejax':
      graph.setdefault(_package(module), set()).update(
          _package(d) for d in deps if d != 'moejax')
  return {p: deps - {p} for p, deps in graph.items()}


def _assert_no_loop(graph: dict[str, set[str]], what: str) -> None:
  """No node of `graph` (node -> nodes it points to) reaches itself."""
  for start in graph:
    seen, todo = set(), list(graph[start])
    while todo:
      node = todo.pop()
      assert node != start, f'{what} through {start}'
      if node not in seen:
        seen.add(node)
        todo.extend(graph.get(node, ()))


def _check_floors(graph: dict[str, set[str]]) -> None:
  floor = {p: i for i, ps in enumerate(FLOORS) for p in ps}
  assert not set(graph) - set(floor), f'packages on no floor: {set(graph) - set(floor)}'
  up = [(p, d) for p, deps in graph.items() for d in deps if floor[d] > floor[p]]
  assert not up, f'imports pointing up a floor: {up}'
  _assert_no_loop(graph, 'package loop')


def test_packages_import_one_way():
  """Entry points -> measurement -> training -> parts -> foundations: nothing imports a floor above
  its own, every package is on a floor, and no two packages import each other through any path."""
  _check_floors(package_imports())


@pytest.mark.parametrize('change', [
    {'config': {'data'}},                     # an arrow up (config -> data.buckets was one)
    {'convert': {'validation'}},              # a loop on one floor (validation -> convert)
    {'hub': set()},                           # a package placed on no floor
])
def test_the_floor_check_can_fail(change):
  graph = package_imports()
  for p, deps in change.items():
    graph[p] = graph.get(p, set()) | deps
  with pytest.raises(AssertionError):
    _check_floors(graph)


def test_config_files_are_not_a_package_and_load_without_a_circle():
  """configs/ holds files loaded by path: no __init__.py, no `import configs`, nothing installed
  under that name, and config_files.sibling links them without a circle."""
  import re
  top = os.path.dirname(ROOT)
  folder = os.path.join(top, 'configs')
  assert not os.path.exists(os.path.join(folder, '__init__.py'))
  assert '"configs' not in open(os.path.join(top, 'pyproject.toml')).read()
  links = {}
  for name in os.listdir(folder):
    if name.endswith('.py'):
      text = open(os.path.join(folder, name)).read()
      assert not re.search(r'^\s*(from|import) configs\b', text, re.M), name
      links[name[:-3]] = set(re.findall(r"sibling\(__file__, '(\w+)'\)", text))
  _assert_no_loop(links, 'config file circle')


def test_no_import_cycles():
  graph = imports()
  graph = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph.items()}
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for d in graph.get(m, ()):
      assert state.get(d) != 1, f'import cycle: {" -> ".join(path + [d])}'
      if d not in state:
        visit(d, path + [d])
    state[m] = 2
  for m in graph:
    if m not in state:
      visit(m, [m])


def _functions():
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        for node in ast.walk(ast.parse(open(path).read())):
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield os.path.relpath(path, ROOT), node


def test_no_function_over_60_lines():
  long = [(path, f.name, f.end_lineno - f.lineno + 1) for path, f in _functions()
          if f.end_lineno - f.lineno + 1 > 60]
  assert not long, long


def test_nothing_in_the_package_imports_the_repositorys_configs():
  for path, node in ((p, n) for d, _, fs in os.walk(ROOT) for p in [os.path.join(d, f)
                     for f in fs if f.endswith('.py')]
                     for n in ast.walk(ast.parse(open(p).read()))):
    if isinstance(node, ast.ImportFrom):
      assert not (node.module or '').startswith('configs'), path
    elif isinstance(node, ast.Import):
      assert not any(a.name.startswith('configs') for a in node.names), path


def test_one_block_module():
  """Cached decoding runs the training model's block, not a copy of it or of its parts:
  attention, norms, MLPs and the router's prefix and gates (routing.choose, routing.gates)."""
  decode = open(os.path.join(ROOT, 'model', 'decode.py')).read()
  imported = {a.name for node in ast.walk(ast.parse(decode)) if isinstance(node, ast.ImportFrom)
              and node.module == 'moejax.model.layers' for a in node.names}
  assert 'Block' in imported
  for copy in ('dot_product_attention', 'wqkv', 'Attention', 'norm(', 'DenseMLP', 'dense_ffn',
               'routing.', 'take_along_axis', 'expert_ffn'):
    assert copy not in decode, copy
  cached = open(os.path.join(ROOT, 'model', 'cached_moe.py')).read()
  assert 'routing.choose(' in cached and 'routing.gates(' in cached
  assert 'take_along_axis' not in cached and 'softmax' not in cached


def test_no_large_tracked_files():
  top = os.path.dirname(ROOT)
  large = [f for f in _tracked_files() if os.path.getsize(os.path.join(top, f)) > 512 * 1024]
  assert not large, large


def test_the_loop_is_the_loop_alone():
  """Signals, the save guard, resume and evaluation live in modules of their own."""
  lines = open(os.path.join(ROOT, 'train', 'loop.py')).read().count('\n')
  assert lines <= 250, lines
  for name in ('signals', 'guard', 'resume', 'evaluation', 'memory'):
    assert os.path.exists(os.path.join(ROOT, 'train', f'{name}.py')), name


def _tracked_files() -> list[str]:
  import subprocess
  top = os.path.dirname(ROOT)
  out = subprocess.run(['git', 'ls-files'], cwd=top, capture_output=True, text=True).stdout
  return [f for f in out.split() if os.path.isfile(os.path.join(top, f))]


def test_no_file_cites_a_document_the_repository_lacks():
  """Every `NAME.md` a tracked text file names is a tracked file (DESIGN.md, STYLE.md are not)."""
  import re
  top = os.path.dirname(ROOT)
  files = _tracked_files()
  have = {os.path.basename(f) for f in files}
  missing = set()
  for f in files:
    if f != 'tests/test_imports.py' and (f.endswith(('.py', '.md', '.sh', '.toml', '.txt'))
                                          or f.startswith('.ci/')):
      for name in re.findall(r'\b([\w-]+\.md)\b', open(os.path.join(top, f)).read()):
        if name not in have:
          missing.add((f, name))
  assert not missing, sorted(missing)


def test_benchmarks_open_with_current_figures():
  """BENCHMARKS.md's first section is the table of current figures, each row with its value,
  command, machine, date and commit."""
  import re
  text = open(os.path.join(os.path.dirname(ROOT), 'BENCHMARKS.md')).read()
  first = text.split('\n## ')[1]
  assert first.startswith('Current figures'), first[:40]
  rows = [r for r in first.splitlines() if r.startswith('| ') and not r.startswith('| figure')]
  assert len(rows) >= 5
  for row in rows:
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert len(cells) == 6 and all(cells), row
    assert re.search(r'20\d\d-\d\d-\d\d', cells[4]) and re.search(r'\b[0-9a-f]{7}\b', cells[5]), row


def _legend_table() -> dict[str, str]:
  """BUILD.md's shape letters: letter -> meaning."""
  import re
  text = open(os.path.join(os.path.dirname(ROOT), 'BUILD.md')).read()
  section = text.split('## Shape letters')[1].split('\n## ')[0]
  table = {}
  for row in re.findall(r'^\| (.+) \|$', section, re.M):
    cells = [c.strip() for c in row.split('|')]
    for letter, meaning in zip(cells[::2], cells[1::2]):
      if letter not in ('letter', '---'):
        table[letter] = meaning
  return table


def _legend_mismatches(source: str, table: dict[str, str]) -> list[str]:
  """Items of a module's `Legend:` sentence whose letter is not in the table or means another
  thing there (the table's meaning must appear in the item's)."""
  if 'Legend:' not in source:
    return []
  text = ' '.join(source.split('Legend:', 1)[1].split())
  depth, items, item = 0, [], ''
  for i, ch in enumerate(text + ' '):
    depth += (ch == '(') - (ch == ')')
    if depth == 0 and (ch in ',;' or (ch == '.' and text[i + 1:i + 2] in (' ', ''))):
      items.append(item)
      item = ''
      if ch == '.':
        break
    else:
      item += ch
  bad = []
  for item in items:
    letter, _, meaning = item.strip().partition(' ')
    letter = letter.rstrip('_')
    if letter not in table or table[letter] not in meaning:
      bad.append(item.strip())
  return bad


def test_every_legend_uses_the_one_table_of_shape_letters():
  """Every module's `Legend:` says what BUILD.md's table of shape letters says (K is key/value
  heads everywhere, top-k is P; S is pipeline stages, tokens per group Q; ...)."""
  table = _legend_table()
  assert table['K'] == 'key/value heads' and len(table) >= 20
  bad, seen = {}, 0
  for path in sorted(os.path.join(d, f) for d, _, fs in os.walk(ROOT) for f in fs
                     if f.endswith('.py')):
    source = open(path).read()
    seen += 'Legend:' in source
    if _legend_mismatches(source, table):
      bad[os.path.relpath(path, ROOT)] = _legend_mismatches(source, table)
  assert seen >= 10 and not bad, bad
  # the check can fail: a legend that reuses K for top-k
  assert _legend_mismatches('"""x.\n\nLegend: G routing groups, K top-k.\n"""', table) == ['K top-k']


def _undefined_names(paths: list[str]) -> list[str]:
  """pyflakes' undefined-name findings (a NameError waiting for the line to run) in `paths`."""
  from pyflakes import api, messages, reporter

  class Found(reporter.Reporter):
    def __init__(self):
      super().__init__(None, None)
      self.found = []

    def flake(self, message):
      if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal,
                              messages.UndefinedExport)):
        self.found.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):
      self.found.append(f'{filename}:{lineno}: {msg}')

  found = Found()
  for path in paths:
    api.checkPath(path, found)
  return found.found


def test_no_name_is_used_before_it_exists():
  """No module of the package, the entry point, the config files, the scripts or the tests uses
  a name it never defines (a NameError only the line's first run would show)."""
  top = os.path.dirname(ROOT)
  paths = [os.path.join(top, f) for f in _tracked_files() if f.endswith('.py')]
  assert len(paths) > 50 and not _undefined_names(paths), _undefined_names(paths)
  import tempfile
  with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
    f.write('def setup(config):\n  need = config.devices\n  return m.dp * need\n')
  assert len(_undefined_names([f.name])) == 1        # the check can fail
  os.unlink(f.name)
