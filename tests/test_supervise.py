"""The supervisor of a multi-process run names the process that went away from XLA's own words."""
import pytest

from moejax.cli import supervise

# What XLA's coordination service logs when process 1 stops beating, as jaxlib 0.12 words it
# (task ids alone on the lines after the message) and as jaxlib 0.10 did (task names).
JAXLIB_012 = """F1205 23:48:45.256248   26761 client.h:86] Terminating process because the JAX \
distributed service detected fatal errors. This most likely indicates that another task died
absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. \
preemption, eviction) to debug further.
"""
JAXLIB_010 = JAXLIB_012.replace('\n1\n', '\n/job:jax_worker/replica:0/task:1\n')


def test_the_lost_process_is_named_in_each_jaxlib_wording():
  assert supervise.lost_processes(JAXLIB_012) == {1}
  assert supervise.lost_processes(JAXLIB_010) == {1}
  assert supervise.lost_processes('Task 3 heartbeat timeout. This indicates ...') == {3}
  several = JAXLIB_012.replace('\n1\n', '\n1\n2\n')
  assert supervise.lost_processes(several) == {1, 2}
  assert supervise.lost_processes('UNAVAILABLE: Stream removed (Socket closed)\n12 ms') == set()


def test_the_error_line_names_the_lost_process(tmp_path, capsys):
  supervise._report(6, [JAXLIB_012], str(tmp_path), 0, 2, pid=-1)
  line = capsys.readouterr().err.strip().splitlines()[-1]
  assert line.startswith('error: process 1 of 2 went away (XLA\'s coordination service'), line
  assert 'The following tasks are unhealthy' in line and 'newest complete checkpoint is none' in line


def test_the_peer_timeout_is_carried_and_checked():
  """--peer_timeout reaches the cluster (the peer watch's limit; XLA's heartbeat twice it); one
  shorter than a few beats is one error naming the flag."""
  from moejax import runtime
  from moejax.errors import ConfigError
  cluster = runtime.detect('127.0.0.1:1234', 2, 1, 120, 7)
  assert cluster.peer_timeout_s == 7 and runtime._heartbeat_timeout_s(cluster) == 14
  with pytest.raises(ConfigError, match='--peer_timeout=3: .* use at least 5'):
    runtime.detect('', 1, 0, 120, 3)
