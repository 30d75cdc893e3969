"""A test that hangs fails within the suite's time limit, naming itself, with every thread's
stack (tests/conftest.py), its subprocesses killed, under pytest-xdist as in CI; a test marked
time_limit gets longer."""
import os
import shutil
import subprocess
import sys
import time

_HANGS = '''
import subprocess
import sys
import threading
import time

import pytest

def waits_for_a_peer(event):
  event.wait()

def test_hangs_like_a_rendezvous():
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  open('child.pid', 'w').write(str(child.pid))   # like a hung main.py: killed with the worker
  event = threading.Event()
  threading.Thread(target=waits_for_a_peer, args=(event,), daemon=True).start()
  event.wait()

def test_quick():
  pass

@pytest.mark.time_limit(30)
def test_long_but_allowed():
  time.sleep(5)
'''


def test_a_hanging_test_fails_in_its_limit_with_every_threads_stack(tmp_path):
  here = os.path.dirname(os.path.abspath(__file__))
  shutil.copy(os.path.join(here, 'conftest.py'), tmp_path / 'conftest.py')
  (tmp_path / 'test_hang.py').write_text(_HANGS)
  env = dict(os.environ, MOEJAX_TEST_TIME_LIMIT_S='3')
  start = time.time()
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '1', '-p', 'no:cacheprovider',
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  took = time.time() - start
  text = out.stdout + out.stderr
  assert out.returncode != 0, text
  assert took < 60, f'{took:.0f} s'
  assert 'error: test_hang.py::test_hangs_like_a_rendezvous ran past its 3 s limit' in text, text
  assert 'waits_for_a_peer' in text and 'test_hangs_like_a_rendezvous' in text, text
  assert "crashed while running 'test_hang.py::test_hangs_like_a_rendezvous'" in text, text
  assert '2 passed' in text, text          # the others run; a time_limit mark gives more
  pid = int((tmp_path / 'child.pid').read_text())
  assert not os.path.exists(f'/proc/{pid}') or 'Z' in open(f'/proc/{pid}/stat').read().split()[2]
