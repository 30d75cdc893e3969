"""Every test runs on 16 simulated CPU devices (set before JAX's first use), and every program
compiled by the test process or its subprocesses goes through one persistent compilation cache
per test run (a temporary directory), so an end-to-end run recompiles nothing a test compiled."""
import os
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=16').strip()
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='moejax_jit_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# End-to-end modules (runs in subprocesses, several processes, whole CLIs): the quick tier
# (`pytest -m "not slow"`) leaves them out.
SLOW_MODULES = {'test_bench', 'test_checkpoint', 'test_faults', 'test_multiprocess', 'test_plot',
                'test_open_models',
                'test_train', 'test_walkthrough', 'test_text_data'}


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end tests left out of the quick tier')


def pytest_collection_modifyitems(config, items):
  import pytest
  for item in items:
    if item.module.__name__.rsplit('.', 1)[-1] in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
