"""The run directory: one owner at a time (a lock file), and its metrics log on resume.

The lock `<workdir>/run.lock` holds the owner's host, pid and start time. A second run on the
same directory refuses while the owner lives; a lock whose owner is gone (same host, no such
process) is taken over with a notice. Multi-process runs take it once, on process 0.
"""
from __future__ import annotations

import json
import os
import socket
import time

from moejax.errors import WorkdirInUse

LOCK = 'run.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """Context manager owning `workdir` for this process (a no-op when `enabled` is False)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK)
    self.enabled = enabled
    self.held = False

  def __enter__(self) -> 'RunLock':
    if not self.enabled:
      return self
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._owner()
        if owner is None and time.time() - os.path.getmtime(self.path) < 10:
          owner = {'host': '?', 'pid': '?', 'started': os.path.getmtime(self.path)}  # being written
        if owner is not None and (owner.get('host') != me['host'] or _alive(owner['pid'])):
          since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))
          raise WorkdirInUse(
              f'{os.path.dirname(self.path)} is in use by the run with pid {owner["pid"]} on '
              f'{owner["host"]} (started {since}); use another --workdir, or stop that run. '
              f'If it is gone (another host), delete {self.path}.') from None
        print(f'Taking over {self.path}: its owner ({owner or "unreadable lock"}) is gone.',
              flush=True)
        os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirInUse(f'Could not take {self.path}: another run took it first.')

  def _owner(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def __exit__(self, *exc) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except OSError:
        pass
      self.held = False


def drop_records_after(metrics_path: str, step: int) -> int:
  """Removes records of steps after `step` from metrics.jsonl (steps re-run after a crash);
  returns how many were removed."""
  if not os.path.exists(metrics_path):
    return 0
  with open(metrics_path) as f:
    lines = f.readlines()
  keep = [l for l in lines if l.strip() and json.loads(l).get('step', 0) <= step]
  if len(keep) != len([l for l in lines if l.strip()]):
    tmp = metrics_path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, metrics_path)
  return len(lines) - len(keep)
