"""The run directory: one owner at a time (a lock file with a heartbeat), its metrics log on
resume, and what a dead run left behind.

The lock `<workdir>/run.lock` holds the owner's host, pid and start time; the owner refreshes
its modification time every HEARTBEAT_S seconds. A second run on the same directory refuses
while the owner lives. A lock is stale when its owner is gone: on the same host, no such
process; on any host, no heartbeat for STALE_S seconds (a job requeued on another node resumes
without a manual delete). A stale lock is taken over atomically: of several runs trying at
once, exactly one wins. Multi-process runs take it once, on process 0.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import threading
import time

from moejax.errors import ClusterError, WorkdirInUse

LOCK = 'run.lock'
HEARTBEAT_S = 30.0    # the owner refreshes the lock's mtime this often
STALE_S = 180.0       # a lock not refreshed for this long is stale, whatever its host


def _alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True


class RunLock:
  """Context manager owning `workdir` for this process (a no-op when `enabled` is False)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK)
    self.enabled = enabled
    self.held = False
    self._stop = threading.Event()

  def __enter__(self) -> 'RunLock':
    if not self.enabled:
      return self
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    for _ in range(20):
      if self._create(me):
        break
      stale = self._stale(me)        # None: gone or being written; try again
      if stale is not None and self._take_over(stale, me):
        break
    else:
      raise WorkdirInUse(f'Could not take {self.path}: other runs keep taking it.')
    self.held = True
    threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True).start()
    return self

  def _create(self, me: dict) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return True

  def _stale(self, me: dict):
    """The lock's text if its owner is gone; raises WorkdirInUse if it lives; None if the lock
    vanished or is being written (try again)."""
    try:
      with open(self.path) as f:
        text = f.read()
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return None
    try:
      owner = json.loads(text)
    except ValueError:
      if age < 10:        # being written by its creator
        time.sleep(0.2)
        return None
      owner = None
    if owner is not None and age < STALE_S and (
        owner.get('host') != me['host'] or _alive(owner.get('pid', -1))):
      since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))
      raise WorkdirInUse(
          f'{os.path.dirname(self.path)} is in use by the run with pid {owner.get("pid")} on '
          f'{owner.get("host")} (started {since}, heartbeat {age:.0f}s ago); use another '
          f'--workdir, or stop that run. A lock without a heartbeat for {STALE_S:.0f}s is '
          f'taken over by the next run.')
    return text

  def _take_over(self, stale_text: str, me: dict) -> bool:
    """Replaces the stale lock by ours under a takeover mutex (O_EXCL), after checking it is
    still the stale one: exactly one of several runs doing this at once succeeds."""
    mutex = self.path + '.takeover'
    try:
      fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:    # a takeover that died midway leaves its mutex: old ones are removed
        if time.time() - os.path.getmtime(mutex) > 30:
          os.remove(mutex)
      except OSError:
        pass
      time.sleep(0.2)
      return False
    os.close(fd)
    try:
      try:
        with open(self.path) as f:
          if f.read() != stale_text:
            return False             # someone else took it meanwhile
      except FileNotFoundError:
        pass
      tmp = f'{self.path}.{os.getpid()}.tmp'
      with open(tmp, 'w') as f:
        json.dump(me, f)
      os.replace(tmp, self.path)
    finally:
      os.remove(mutex)
    owner = _parse(stale_text)
    print(f'Taking over {self.path}: its owner '
          f'({owner if owner else "unreadable lock"}) is gone.', flush=True)
    return True

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self.held:
      try:
        os.remove(self.path)
      except OSError:
        pass
      self.held = False


def check_shared(lock: RunLock) -> None:
  """Several processes must see one --workdir: every process reads process 0's lock there; a
  process that does not see it is a ClusterError on all, before anything is compiled."""
  import jax
  from moejax import runtime
  written = _digest(lock.path) if jax.process_index() == 0 else 0
  written = runtime.agree(written)        # a sync point: process 0's lock is on disk by now
  blind = runtime.processes_where(_digest(lock.path) != written)
  if blind:
    raise ClusterError(
        f'--workdir={os.path.dirname(lock.path)} is not one directory shared by every process: '
        f'process(es) {blind} do not see the lock process 0 wrote there. Pass every process '
        f'the same --workdir on a filesystem all hosts mount (NFS, Lustre, a bucket mount); '
        f'checkpoints written to local disks could not be resumed.')


def _digest(path: str) -> int:
  """A 31-bit digest of a file's bytes; -1 when it cannot be read."""
  try:
    with open(path, 'rb') as f:
      return int.from_bytes(hashlib.sha256(f.read()).digest()[:4], 'little') >> 1
  except OSError:
    return -1


def release_dead_owner(workdir: str, pid: int) -> None:
  """Removes the run lock if process `pid` of this host held it (a trainer that was killed)."""
  path = os.path.join(workdir, LOCK)
  try:
    with open(path) as f:
      owner = _parse(f.read()) or {}
    if owner.get('pid') == pid and owner.get('host') == socket.gethostname():
      os.remove(path)
  except OSError:
    pass


def _parse(text: str) -> dict | None:
  try:
    return json.loads(text)
  except ValueError:
    return None


def repair_metrics(metrics_path: str, step: int) -> tuple[int, int]:
  """Rewrites metrics.jsonl without records of steps after `step` (re-run after a crash) and
  without lines that are not whole records (a crash mid-write); returns (records of later
  steps dropped, broken lines dropped)."""
  if not os.path.exists(metrics_path):
    return 0, 0
  with open(metrics_path) as f:
    lines = [l for l in f.read().split('\n') if l.strip()]
  keep, later, broken = [], 0, 0
  for line in lines:
    record = _parse(line)
    if not isinstance(record, dict):
      broken += 1
    elif record.get('step', 0) > step:
      later += 1
    else:
      keep.append(line + '\n')
  if later or broken:
    tmp = metrics_path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, metrics_path)
  return later, broken


def remove_dead_temporaries(checkpoint_dir: str) -> list[str]:
  """Removes the temporary step directories an interrupted save left (Orbax's
  `N.orbax-checkpoint-tmp-*`; never a complete step); returns their names. Only the lock's
  holder calls this, so no live run is writing them."""
  dead = sorted(glob.glob(os.path.join(checkpoint_dir, '*.orbax-checkpoint-tmp*')))
  for path in dead:
    shutil.rmtree(path, ignore_errors=True)
  return [os.path.basename(p) for p in dead]
