"""The stall watch (moejax/train/stall.py): steps that keep finishing on the devices are never a
stall however far the host ran ahead; a step that never finishes ends the run with its name and
every thread's stack; 0 turns it off."""
import threading
import time

from moejax.train.stall import StallWatch


class Finishes:
  """A step's output that becomes ready at a given time (a stand-in for a jax.Array)."""

  def __init__(self, at: float):
    self.at = at

  def is_ready(self) -> bool:
    return time.monotonic() >= self.at


def watch(tmp_path, limit_s: float, start: int = 0):
  stalls = []
  fired = threading.Event()
  w = StallWatch(limit_s, start, lambda why: (stalls.append(why), fired.set()),
                 str(tmp_path))
  return w, stalls, fired


def test_steps_that_keep_finishing_are_no_stall_while_the_host_waits(tmp_path):
  w, stalls, fired = watch(tmp_path, limit_s=0.5)
  w.start()
  now = time.monotonic()
  for step in range(1, 7):                       # dispatched at once; one finishes every 0.3 s
    w.step_dispatched(step, Finishes(now + 0.3 * step))
  assert not fired.wait(2.0), stalls             # the host waits 2 s (> 4 limits) on the devices
  w.stop()
  assert not stalls


def test_a_step_that_never_finishes_ends_the_run_with_every_threads_stack(tmp_path):
  w, stalls, fired = watch(tmp_path, limit_s=0.5, start=5)
  w.start()
  w.step_dispatched(6, Finishes(0.0))
  w.step_dispatched(7, Finishes(float('inf')))
  started = time.monotonic()
  assert fired.wait(10.0)
  assert 0.5 <= time.monotonic() - started < 5.0
  why, = stalls
  assert why.startswith('no progress for ') and 'step 7 has not finished on the devices' in why
  assert 'the newest finished step is 6' in why and str(tmp_path / 'process_0.stall.log') in why
  stacks = (tmp_path / 'process_0.stall.log').read_text()
  assert 'test_a_step_that_never_finishes_ends_the_run' in stacks   # the waiting main thread
  assert '_watch' in stacks                                          # and the watch itself


def test_a_loop_that_stops_moving_on_is_a_stall_and_zero_turns_the_watch_off(tmp_path):
  w, stalls, fired = watch(tmp_path, limit_s=0.3, start=2)
  w.start()
  w.step_dispatched(3, Finishes(0.0))
  assert fired.wait(10.0)
  assert 'the training loop has not moved on' in stalls[0] and 'finished step is 3' in stalls[0]
  off, stalls, fired = watch(tmp_path, limit_s=0)
  off.start()
  off.step_dispatched(1, Finishes(float('inf')))
  assert not fired.wait(1.0) and off._thread is None
  off.stop()
