"""Every test runs on 16 simulated CPU devices (set before JAX's first use), and every program
compiled by the test process or its subprocesses goes through one persistent compilation cache
per test run (a temporary directory), so an end-to-end run recompiles nothing a test compiled."""
import faulthandler
import os
import signal
import sys
import tempfile
import threading

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# XLA:CPU's LLVM at -O0: test programs run on tiny shapes, where the slower code costs less than
# the compile saves; the numbers are the same to float32 rounding. (Under jax 0.10 a second flag,
# the classic loop emitters instead of the MLIR fusion emitters, made compiles 2.5x faster still;
# jax 0.12's XLA:CPU no longer has it.) Subprocesses get the same flags
# (tests.helpers.subprocess_env) without the device count: main.py simulates its own devices.
# Eigen single-threaded inside each device's thunks (the tests' shapes are tiny): tried against a
# 16-device main.py run that deadlocked in XLA:CPU's collective rendezvous under load (as
# PyAutoLabs/PyAutoFit#1530 reports of the Eigen pool); it did not stop it, and that test's run
# now uses XLA's default flags (tests/test_train.py).
os.environ.setdefault('MOEJAX_TEST_XLA_FLAGS', '--xla_backend_optimization_level=0 '
                      '--xla_cpu_multi_thread_eigen=false')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    os.environ['MOEJAX_TEST_XLA_FLAGS'],
                                    '--xla_force_host_platform_device_count=16']).strip()
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='moejax_jit_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiers, set by marks in each module: `pytestmark = pytest.mark.e2e` (runs in subprocesses,
# several processes, whole CLIs) and `pytestmark = pytest.mark.mesh` (mesh-equivalence cases) are
# slow, except the cases a mesh module marks `quick` (its unit tests, one mesh-equivalence case,
# one 1x1-vs-NumPy case); the quick tier (`pytest -m "not slow"`) leaves the slow ones out.
# `one_worker` (with e2e): the module's tests extend one module-scoped run in order, so one
# pytest-xdist worker runs the module whole (`--dist loadgroup`), and such modules start first:
# they are the longest.
MARKS = {'e2e': 'end-to-end: slow', 'mesh': 'mesh-equivalence cases: slow unless quick',
         'quick': 'a mesh module\'s case kept in the quick tier',
         'one_worker': 'the module runs whole on one xdist worker, first',
         'slow': 'left out of the quick tier (set from e2e / mesh / quick)',
         'time_limit(seconds)': 'a longer time limit than MOEJAX_TEST_TIME_LIMIT_S'}


def _module(item) -> str:
  return item.module.__name__.rsplit('.', 1)[-1]


def _slow(item) -> bool:
  marks = {m.name for m in item.iter_markers()}
  return 'e2e' in marks or ('mesh' in marks and 'quick' not in marks)


# Every test's time limit (setup, call and teardown; module-scoped fixtures count in the first
# test that uses them): past it the test's process prints the test's name and every thread's
# Python stack to the terminal's stderr and exits, which pytest-xdist reports as that test
# failing ("worker crashed while running ..."), instead of hanging until CI's limit. A test
# marked time_limit(S) gets S seconds (the chaos run: 7 minutes under the suite's load).
TIME_LIMIT_S = float(os.environ.get('MOEJAX_TEST_TIME_LIMIT_S', '600'))
TIMED_OUT_EXIT = 3


def _descendants(pid: int) -> list[int]:
  """The processes below `pid` (Linux's /proc; none elsewhere), children first."""
  children: dict[int, list[int]] = {}
  for name in os.listdir('/proc') if os.path.isdir('/proc') else []:
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
      continue
    children.setdefault(ppid, []).append(int(name))
  found, todo = [], list(children.get(pid, []))
  while todo:
    found.append(todo.pop(0))
    todo += children.get(found[-1], [])
  return found


def _time_out(item, limit: float) -> None:
  """Runs on a timer thread: the stacks to the real stderr (pytest's capture suspended), the
  test's subprocesses killed (a hung main.py would outlive the worker), exit."""
  capman = item.config.pluginmanager.getplugin('capturemanager')
  if capman is not None:
    capman.suspend()
  os.write(2, (f'\nerror: {item.nodeid} ran past its {limit:.0f} s limit '
               f'(MOEJAX_TEST_TIME_LIMIT_S); every thread\'s stack:\n').encode())
  faulthandler.dump_traceback(file=2, all_threads=True)
  try:
    for pid in _descendants(os.getpid()):
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
  finally:
    os._exit(TIMED_OUT_EXIT)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  mark = item.get_closest_marker('time_limit')       # a longer limit for a long test
  limit = max(TIME_LIMIT_S, mark.args[0]) if mark else TIME_LIMIT_S
  timer = threading.Timer(limit, _time_out, (item, limit))
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def pytest_configure(config):
  for name, meaning in MARKS.items():
    config.addinivalue_line('markers', f'{name}: {meaning}')


@pytest.hookimpl(tryfirst=True)    # before pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
  one_worker = []
  for item in items:
    if _slow(item):
      item.add_marker(pytest.mark.slow)
    if item.get_closest_marker('one_worker'):
      item.add_marker(pytest.mark.xdist_group(_module(item)))
      one_worker += [_module(item)] if _module(item) not in one_worker else []
  first = {m: i for i, m in enumerate(one_worker)}
  items.sort(key=lambda item: first.get(_module(item), len(first)))   # stable otherwise
