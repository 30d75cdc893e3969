"""A stalled run ends instead of hanging: when neither a step finishes on the devices nor the loop
moves on for `limit_s` seconds (a collective that never completes, a lost device, a save that
never returns), every thread's Python stack goes to a file in the workdir and the process ends
with one error line naming that file and the newest complete checkpoint.

Steps are dispatched ahead of the devices, so the host loop alone cannot tell a slow step from a
hung one: the watch also follows each dispatched step's loss until it is ready (a non-blocking
poll from its own thread), so a run whose steps finish, however far the host ran ahead, never
counts as stalled.
"""
from __future__ import annotations

import collections
import faulthandler
import os
import threading
import time
from typing import Callable

import jax


class StallWatch:
  """Between `start` and `stop`, `limit_s` seconds without progress calls `on_stall(message)`
  (which must end the process) after writing every thread's stack to `process_<i>.stall.log` in
  `workdir`. Progress: `step_dispatched` arrays becoming ready, and `moved_on` calls. `start`:
  the step the run resumed at. Off when limit_s is 0."""

  def __init__(self, limit_s: float, start: int, on_stall: Callable[[str], None], workdir: str):
    self.limit_s, self.on_stall = limit_s, on_stall
    self.stacks_path = os.path.join(workdir, f'process_{jax.process_index()}.stall.log')
    self._pending: collections.deque = collections.deque()   # (step, array) not yet ready
    self._last = time.monotonic()
    self._done = start                                        # newest step finished on devices
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> None:
    if self.limit_s > 0:
      self._last = time.monotonic()
      self._thread = threading.Thread(target=self._watch, name='stall-watch', daemon=True)
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def moved_on(self) -> None:
    """The loop finished something on the host (a step's bookkeeping, an evaluation, a save)."""
    self._last = time.monotonic()

  def step_dispatched(self, step: int, done_when_ready: jax.Array) -> None:
    """Step `step` is on its way; it has finished when `done_when_ready` is ready."""
    if self._thread is not None:
      self._pending.append((step, done_when_ready))
    self.moved_on()

  def _watch(self) -> None:
    poll_s = min(1.0, self.limit_s / 4)
    while not self._stop.wait(poll_s):
      while self._pending and self._pending[0][1].is_ready():
        self._done = self._pending.popleft()[0]
        self._last = time.monotonic()
      quiet = time.monotonic() - self._last
      if quiet > self.limit_s and not self._stop.is_set():
        self._stalled(quiet)
        return

  def _stalled(self, quiet: float) -> None:
    waiting = (f'step {self._pending[0][0]} has not finished on the devices'
               if self._pending else 'the training loop has not moved on')
    try:
      os.makedirs(os.path.dirname(self.stacks_path) or '.', exist_ok=True)
      with open(self.stacks_path, 'w') as f:
        f.write(f'No progress for {quiet:.0f}s ({waiting}); every thread\'s stack:\n')
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
      where = f'every thread\'s stack is in {self.stacks_path}'
    except OSError as e:
      where = f'the stacks could not be written ({e.strerror})'
    self.on_stall(
        f'no progress for {quiet:.0f}s: {waiting} (a collective that never completes, a lost '
        f'device, a stuck read or save; the newest finished step is {self._done}); {where}. If '
        f'steps are really this slow, raise --config.stall_timeout_s (0 turns the watch off)')
