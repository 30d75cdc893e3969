"""The run directory without training: the lock (stale on any host without a heartbeat, taken
over atomically), the metrics log after a crash, a dead run's temporary checkpoints, and the host
memory check on CPUs."""
import json
import os
import subprocess
import sys
import time
import types

import pytest

from moejax.errors import DeviceMemoryError, WorkdirInUse
from moejax.train import memory, workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lock(tmp_path, host, pid, age_s):
  lock = tmp_path / workdir_lib.LOCK
  lock.write_text(json.dumps({'host': host, 'pid': pid, 'started': 0}))
  os.utime(lock, (time.time() - age_s, time.time() - age_s))
  return lock


def test_a_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path, capsys):
  _lock(tmp_path, 'node-7', 12345, age_s=5)
  with pytest.raises(WorkdirInUse, match='node-7 .*heartbeat 5s ago'):
    with workdir_lib.RunLock(str(tmp_path)):
      pass
  lock = _lock(tmp_path, 'node-7', 12345, age_s=workdir_lib.STALE_S + 10)
  with workdir_lib.RunLock(str(tmp_path)):                 # a requeued job on another node
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert 'is gone' in capsys.readouterr().out and not lock.exists()


def test_the_owner_refreshes_the_heartbeat(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_S', 0.05)
  with workdir_lib.RunLock(str(tmp_path)) as held:
    os.utime(held.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.path.getmtime(held.path) < 5


RACER = '''
import sys, time, json
from moejax.train import workdir
from moejax.errors import WorkdirInUse
start = float(sys.argv[2])
time.sleep(max(start - time.time(), 0))
try:
  with workdir.RunLock(sys.argv[1]):
    print('won', flush=True)
    time.sleep(1.5)
except WorkdirInUse:
  print('refused', flush=True)
'''


def test_exactly_one_of_several_runs_takes_over_a_stale_lock(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  for trial in range(4):
    workdir = tmp_path / str(trial)
    workdir.mkdir()
    _lock(workdir, os.uname().nodename, dead.pid, age_s=0)
    start = time.time() + 2.0
    racers = [subprocess.Popen([sys.executable, '-c', RACER, str(workdir), str(start)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(5)]
    outs = [r.communicate(timeout=60)[0].strip().splitlines()[-1] for r in racers]
    assert sorted(outs) == ['refused'] * 4 + ['won'], outs


def test_a_partial_metrics_line_and_later_steps_are_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "loss": 1.8}\n'
                  '{"step": 4, "lo')
  assert workdir_lib.repair_metrics(str(path), 2) == (1, 1)
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2]
  assert workdir_lib.repair_metrics(str(path), 2) == (0, 0)


def test_a_dead_runs_temporary_checkpoints_are_removed(tmp_path):
  (tmp_path / '3').mkdir()
  (tmp_path / '4.orbax-checkpoint-tmp-1733').mkdir()
  (tmp_path / '4.orbax-checkpoint-tmp-1733' / 'state').write_text('half')
  assert workdir_lib.remove_dead_temporaries(str(tmp_path)) == ['4.orbax-checkpoint-tmp-1733']
  assert sorted(os.listdir(tmp_path)) == ['3']


def test_a_step_beyond_the_hosts_memory_stops_after_compiling(monkeypatch):
  analysis = types.SimpleNamespace(argument_size_in_bytes=3 << 30, output_size_in_bytes=3 << 30,
                                   alias_size_in_bytes=3 << 30, temp_size_in_bytes=2 << 30)
  compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
  device = types.SimpleNamespace(process_index=0, platform='cpu', memory_stats=lambda: None,
                                 device_kind='cpu')
  mesh = types.SimpleNamespace(devices=types.SimpleNamespace(flat=[device] * 16))
  monkeypatch.setattr(memory, 'host_available', lambda: 40 << 30)
  with pytest.raises(DeviceMemoryError, match=r'needs 80.0 GiB of host memory \(16 simulated CPU '
                     r'devices x 5.00 GiB each\) but this machine has 40.0 GiB available.*:tiny'):
    memory.check_memory(compiled, mesh)
  mesh.devices.flat = [device] * 8                       # 8 x 5 GiB fits
  memory.check_memory(compiled, mesh)
