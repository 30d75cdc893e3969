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
