"""Layers depend one way: parallel/ never imports model/, and no module imports itself back."""
import ast
import os

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
  import subprocess
  top = os.path.dirname(ROOT)
  files = subprocess.run(['git', 'ls-files'], cwd=top, capture_output=True, text=True).stdout
  large = [f for f in files.split() if os.path.isfile(os.path.join(top, f))
           and os.path.getsize(os.path.join(top, f)) > 512 * 1024]
  assert not large, large


def test_the_loop_is_the_loop_alone():
  """Signals, the save guard, resume and evaluation live in modules of their own."""
  lines = open(os.path.join(ROOT, 'train', 'loop.py')).read().count('\n')
  assert lines <= 250, lines
  for name in ('signals', 'guard', 'resume', 'evaluation', 'memory'):
    assert os.path.exists(os.path.join(ROOT, 'train', f'{name}.py')), name
