"""Signals during training: SIGTERM and a first SIGINT stop the loop at the next step boundary
(it saves, then exits); a second SIGINT exits at once."""
from __future__ import annotations

import os
import signal

_ACTIVE: list = []    # the running loop's StopFlag, for signals taken by another thread


def deliver(signum: int) -> bool:
  """Hands a signal taken by a waiting thread (moejax.cli.train) to the running loop; False
  when no loop is running."""
  if not _ACTIVE:
    return False
  _ACTIVE[-1]._handle(signum, None)
  return True


class StopFlag:
  """SIGTERM and a first SIGINT become a flag checked at step boundaries (save, then exit);
  a second SIGINT exits at once (an unfinished save stays invisible under its temporary name)."""

  def __init__(self):
    self.signal = ''
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    _ACTIVE.append(self)

  def _handle(self, signum, frame):
    del frame
    if self.signal == 'SIGINT' and signum == signal.SIGINT:
      os.write(2, b'Second SIGINT: exiting now without saving.\n')
      os._exit(130)
    self.signal = self.signal or signal.Signals(signum).name
    if signum == signal.SIGINT:
      os.write(2, b'SIGINT: finishing this step and saving (Ctrl-C again to exit now).\n')

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    _ACTIVE.remove(self)
