"""The peers of a multi-process run: every process beats in the coordinator's key-value store
from a background thread; a peer whose beats stop (killed, host lost) or a coordinator that
stops answering ends this process within the cluster's peer timeout (`--peer_timeout`, 20 s by
default; moejax.runtime.Cluster) with one error line, rather than a hang
or an abort inside a collective. A process that finishes says so first, so its silence after
that is not a loss. (When the coordinator, process 0, dies, XLA's coordination client aborts
the other processes at once from its own thread, with a native stack trace: jaxlib 0.10 gives
Python no hook for it.)"""
from __future__ import annotations

import threading
import time
from typing import Callable

import jax

from moejax import runtime

BEAT_S = 2.0         # each process beats this often
FIRST_BEAT_S = 90.0  # ... or, before its first beat, this long (processes start at different times)
# What a collective raises when its peer is gone (Gloo on CPU; NCCL and the coordination service
# on GPUs).
_PEER_ERRORS = ('Connection reset by peer', 'Connection closed by peer', 'Gloo', 'NCCL',
                'coordination service', 'Broken pipe', 'heartbeat')


class PeerWatch:
  """Context manager: while inside, a lost peer calls `on_lost(message)` (which must end the
  process). A no-op in a single-process run."""

  def __init__(self, on_lost: Callable[[str], None]):
    self.on_lost = on_lost
    self.enabled = jax.process_count() > 1
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> 'PeerWatch':
    if self.enabled:
      from jax._src import distributed
      self._client = distributed.global_state.client
      self._me, self._count = jax.process_index(), jax.process_count()
      self._lost_s = float(runtime.joined().peer_timeout_s)   # a peer silent this long is gone
      self._thread = threading.Thread(target=self._watch, name='peer-watch', daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join(timeout=2 * BEAT_S)
    try:
      self._client.key_value_set(f'moejax/done/{self._me}', '1', allow_overwrite=True)
    except Exception:
      pass

  def failed_collective(self, error: Exception) -> None:
    """After a runtime error in a multi-process run (a collective whose peer died raises
    before the beats tell): waits for the watch to name the lost peer, else reports the error
    as the loss; either ends the process. Returns (the caller re-raises) in a single process or
    when the error does not come from a lost connection."""
    text = str(error)
    if self._thread is None or not any(s in text for s in _PEER_ERRORS):
      return
    self._thread.join(timeout=self._lost_s + 3 * BEAT_S)    # on_lost ends the process from there
    self.on_lost(f'a peer process went away (a collective failed: {text.splitlines()[0][:160]})')

  def _watch(self) -> None:
    started = time.monotonic()
    seen: dict[int, tuple[str, float]] = {}     # peer -> (its last beat, when it changed)
    done: set[int] = set()
    while not self._stop.wait(BEAT_S):
      try:
        self._client.key_value_increment(f'moejax/beat/{self._me}', 1)
        beats = dict(self._client.key_value_dir_get('moejax/beat/'))
        done |= {int(k.rsplit('/', 1)[-1]) for k, _ in self._client.key_value_dir_get('moejax/done/')}
      except Exception as e:   # the coordinator (process 0) does not answer
        if 0 in done or self._stop.is_set():
          return
        self._lost(f'process 0 of {self._count} (the coordinator) stopped answering '
                   f'({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""})')
        return
      now = time.monotonic()
      for peer in range(self._count):
        if peer == self._me or peer in done:
          continue
        beat = next((v for k, v in beats.items() if k.endswith(f'/{peer}')), None)
        if beat is not None and (peer not in seen or seen[peer][0] != beat):
          seen[peer] = (beat, now)
        quiet = now - (seen[peer][1] if peer in seen else started)
        if quiet > (self._lost_s if peer in seen else FIRST_BEAT_S):
          self._lost(f'process {peer} of {self._count} went away (no heartbeat for '
                     f'{quiet:.0f}s)')
          return

  def _lost(self, why: str) -> None:
    if not self._stop.is_set():
      self.on_lost(why)

