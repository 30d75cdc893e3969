"""Process setup that must happen before JAX's first operation: devices and jax.distributed."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time

import jax
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.errors import ClusterError


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins a multi-process run (num_processes=1: a single process)."""
  coordinator_address: str = ''
  num_processes: int = 1
  process_id: int = 0
  timeout_s: int = 120
  auto: bool = False          # let jax.distributed detect SLURM / Open MPI
  # A peer silent this long is lost (moejax's peer watch, moejax/train/peers.py); XLA's
  # coordination service, which also sees peers lost where the watch cannot (inside a
  # multi-process save's barrier), is given twice as long.
  peer_timeout_s: int = 20


# A few of the peer watch's beats (moejax/train/peers.py, BEAT_S): a shorter limit would take
# one slow beat for a loss.
MIN_PEER_TIMEOUT_S = 5
_joined = Cluster()


def joined() -> Cluster:
  """The cluster this process joined in setup_devices (a single process before that)."""
  return _joined


def detect(coordinator_address: str, num_processes: int, process_id: int,
           timeout_s: int, peer_timeout_s: int = Cluster.peer_timeout_s) -> Cluster:
  """The cluster from flags, else from a SLURM or Open MPI launch of several tasks."""
  if peer_timeout_s < MIN_PEER_TIMEOUT_S:
    raise ConfigError(f'--peer_timeout={peer_timeout_s}: a peer is declared lost after this many '
                      f'silent seconds, which must span a few of its heartbeats; use at least '
                      f'{MIN_PEER_TIMEOUT_S}.')
  if coordinator_address or num_processes > 1:
    if not coordinator_address or num_processes < 2 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f'--coordinator_address={coordinator_address!r} --num_processes={num_processes} '
          f'--process_id={process_id}: a multi-process run needs all three, with '
          f'num_processes >= 2 and 0 <= process_id < num_processes.')
    return Cluster(coordinator_address, num_processes, process_id, timeout_s,
                   peer_timeout_s=peer_timeout_s)
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return Cluster(num_processes=int(os.environ[var]), timeout_s=timeout_s, auto=True,
                     peer_timeout_s=peer_timeout_s)
  return Cluster()


def setup_devices(config: ml_collections.ConfigDict, cluster: Cluster = Cluster()) -> None:
  """Joins the cluster (if any); on CPU-only hosts simulates this process's share of devices."""
  m = config_lib.mesh_shape(config)
  need = m.devices
  if need % cluster.num_processes:
    raise ConfigError(
        f'mesh.dp * mesh.tp * mesh.pp = {need} devices cannot be split evenly over '
        f'{cluster.num_processes} processes; use a mesh that {cluster.num_processes} divides.')
  local = max(need // cluster.num_processes, 1)
  jax.config.update('jax_num_cpu_devices', local)     # affects the CPU backend only
  if cluster.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    global _joined
    _joined = cluster
    _initialize(cluster)
    if jax.default_backend() == 'cpu':
      _compile_in_every_process()
  if jax.default_backend() == 'cpu' and need > 1 and jax.process_index() == 0:
    print(f'No accelerator found: simulating {need} CPU devices ({local} per process) for the '
          f'{m.dp}x{m.tp}x{m.pp} (dp x tp x pp) mesh (numbers are real, speed is not).',
          flush=True)


def _heartbeat_timeout_s(cluster: Cluster) -> int:
  """How long XLA's coordination service waits for a process's heartbeats before it ends every
  process (JAX's default is 100 s): a peer lost where moejax's own peer watch cannot see it
  (inside a multi-process save's barrier) then ends the others soon after, through the
  supervisor's one error line (moejax/cli/supervise.py)."""
  return 2 * cluster.peer_timeout_s


def _compile_in_every_process() -> None:
  """Turns JAX's persistent compilation cache off (multi-process CPU runs). JAX keys a CPU
  program by the process's own devices and only process 0 writes entries, so with a warm cache
  process 0 loads its programs while the others compile theirs, and the first step deadlocked
  in Gloo (process 0 in an all-reduce inside the pipeline's loop, process 1 in an all-gather
  outside it; tests/test_multiprocess.py). Every process compiling its own programs works."""
  if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
    if jax.process_index() == 0:
      print('note: JAX\'s persistent compilation cache is off for this multi-process CPU run '
            '(a cached program in one process beside fresh compiles in the others '
            'deadlocks its collectives).', flush=True)
  jax.config.update('jax_enable_compilation_cache', False)


def _initialize(cluster: Cluster) -> None:
  if cluster.auto:
    jax.distributed.initialize(initialization_timeout=cluster.timeout_s,
                               heartbeat_timeout_seconds=_heartbeat_timeout_s(cluster))
    return
  if cluster.process_id != 0:
    _wait_for_coordinator(cluster.coordinator_address, cluster.timeout_s)
  print(f'process {cluster.process_id}/{cluster.num_processes}: joining coordinator '
        f'{cluster.coordinator_address} (waiting up to {cluster.timeout_s}s for all '
        f'processes)', flush=True)
  jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes,
                             cluster.process_id, initialization_timeout=cluster.timeout_s,
                             heartbeat_timeout_seconds=_heartbeat_timeout_s(cluster))


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  """Polls the coordinator's TCP port, so an unreachable one is an error rather than a hang."""
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ConfigError(f'--coordinator_address={address!r}: expected HOST:PORT.')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ClusterError(
            f'Cannot reach the coordinator at {address} after {timeout_s}s ({e}). Start process '
            f'0 with the same --coordinator_address, check host, port and firewall, or raise '
            f'--coordinator_timeout.') from e
      time.sleep(0.5)


def check_same_config(config: ml_collections.ConfigDict) -> None:
  """Every process must run the same config; a mismatch is an error on all of them."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).digest()
  mine = np.frombuffer(digest[:8], np.int64)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
  if len(set(every.tolist())) > 1:
    differ = [i for i, h in enumerate(every.tolist()) if h != every[0]]
    raise ClusterError(
        f'Processes disagree on the config: processes {differ} differ from process 0. Start '
        f'every process with the same --config file and overrides.')


def processes_where(flag: bool) -> list[int]:
  """The indices of the processes whose `flag` is True, on every process."""
  if jax.process_count() == 1:
    return [0] if flag else []
  from jax.experimental import multihost_utils
  every = np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)
  return [int(i) for i in np.flatnonzero(every)]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any of them."""
  return bool(processes_where(flag))


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
  """Process 0's value of an integer (int32 range: JAX without x64), on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))
