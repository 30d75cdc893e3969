"""A multi-process run's trainer in a child process, so that XLA ending it is one error line.

When a peer dies, XLA's coordination client ends the survivors from its own thread: an abort
with a native log and stack trace (jaxlib 0.10's missed-heartbeat callback cannot reach Python:
its status argument fails to convert). Each process of a multi-process run therefore runs its
trainer as a child: the parent forwards SIGTERM and SIGINT to it, passes its output through,
holds back XLA's fatal native log (and a traceback just before it), and when the child is
ended by a signal says so in one `error:` line naming the process that went away, the newest
complete checkpoint and the log file that got what was held back (in the workdir), releases
the run lock the child held, and exits 1. The child dies with the parent (a SIGKILL of the
parent is a SIGKILL of the run's process). MOEJAX_TRACEBACK=1 also prints what was held back.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

CHILD_ENV = 'MOEJAX_SUPERVISED_CHILD'
# Lines that start XLA's fatal native log: an absl FATAL line, the coordination agent's error
# poll, a C++ terminate, Python's fatal-error dump; and a Python traceback (a collective that
# fails because its peer died raises in the trainer just before XLA ends it). Everything from
# the first is held back: written out if the trainer then exits by itself, else to the log
# file the error line names.
_FATAL = re.compile(r'^(?:F\d{4} \d\d:\d\d:\d\d|E\d{4} .*coordination|terminate called|'
                    r'Fatal Python error|\*\*\* (?:SIG|Check failure)|'
                    r'Traceback \(most recent call last\))')
# The processes that went away, as XLA names them: `/job:jax_worker/replica:0/task:1` (jaxlib
# 0.10), a bare id on the lines after the heartbeat message (jaxlib 0.11+), `Task 1 heartbeat
# timeout` (both).
_TASK = re.compile(r'/task:(\d+)|Task (\d+) heartbeat timeout|'
                   r'stopped sending heartbeats\):\n((?:[ \t]*\d+[ \t]*\n)+)')


def wanted(coordinator_address: str, num_processes: int) -> bool:
  """Whether this process is one of several and not yet the supervised child."""
  several = bool(coordinator_address) or num_processes > 1 or any(
      int(os.environ.get(v, '1') or 1) > 1 for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  return several and not os.environ.get(CHILD_ENV)


def _die_with_parent() -> None:
  import ctypes
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def run_child(workdir: str, process_id: int, num_processes: int) -> int:
  """Runs this command again as the supervised child; returns the exit code for this process."""
  child = subprocess.Popen([sys.executable, *sys.argv], env=dict(os.environ, **{CHILD_ENV: '1'}),
                           stderr=subprocess.PIPE, text=True, errors='replace',
                           start_new_session=True, preexec_fn=_die_with_parent)
  forward = lambda signum, _: child.send_signal(signum)
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, forward)
  held: list[str] = []
  for line in child.stderr:
    if held or _FATAL.match(line):
      held.append(line)
    else:
      sys.stderr.write(line)
      sys.stderr.flush()
  code = child.wait()
  if code >= 0:
    sys.stderr.write(''.join(held))   # not fatal after all: nothing is lost
    return code
  _report(-code, held, workdir, process_id, num_processes, child.pid)
  return 1


def _report(signum: int, held: list[str], workdir: str, process_id: int, num_processes: int,
            pid: int) -> None:
  """One error line for a trainer ended by a signal; the lock it held released."""
  from moejax.train import workdir as workdir_lib
  workdir_lib.release_dead_owner(workdir, pid)
  text = ''.join(held)
  tasks = sorted(lost_processes(text) - {process_id})
  if 'coordination' in text or 'distributed service' in text:
    who = (f'process {tasks[0]} of {num_processes}' if tasks else
           f'process 0 of {num_processes} (the coordinator)' if process_id else 'a peer process')
    why = f'{who} went away (XLA\'s coordination service ended this process: {_reason(text)})'
  else:
    why = (f'process {process_id} of {num_processes}: its trainer was ended by '
           f'{signal.Signals(signum).name}')
  if os.environ.get('MOEJAX_TRACEBACK'):
    sys.stderr.write(text)
  log = os.path.join(workdir, f'process_{process_id}.crash.log')
  try:
    with open(log, 'w') as f:
      f.write(text)
    details = f' (its last output: {log})'
  except OSError:
    details = ''
  print(f'error: {why}; stopping this process too. The newest complete checkpoint is '
        f'{_newest(workdir)}: restart every process with the same command to resume from '
        f'it{details}.', file=sys.stderr, flush=True)


def lost_processes(text: str) -> set[int]:
  """The process ids XLA's fatal log names as gone."""
  return {int(i) for match in _TASK.findall(text) for i in ' '.join(match).split()}


def _reason(text: str) -> str:
  """XLA's own words, one line: the status of its fatal log, or its first line."""
  status = re.search(r'absl::Status: ([^\n]*)', text) or re.search(r'\] ([^\n]*)', text)
  line = status.group(1) if status else text.strip().splitlines()[0]
  return line.split('. ')[0][:160].rstrip('. ')


def _newest(workdir: str) -> str:
  from moejax.train import loop
  return loop.newest_checkpoint(workdir)
