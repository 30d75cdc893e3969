"""Errors a user can cause and fix. The command-line tools print each as one `error: ...` line
(no traceback unless MOEJAX_TRACEBACK=1) and exit non-zero; every message names the fix."""
from __future__ import annotations


class MoejaxError(Exception):
  """Base of every error with a message meant for the user."""


class ConfigError(MoejaxError, ValueError):
  """A config, flag or environment that cannot run."""


class DataError(MoejaxError):
  """Token data that cannot be trained on (missing, truncated, ids beyond the vocabulary)."""


class CheckpointError(MoejaxError):
  """A checkpoint that cannot be read or written."""


class ClusterError(MoejaxError):
  """Processes that cannot form one run (unreachable coordinator, mismatched configs or
  device counts)."""


class DeviceMemoryError(MoejaxError):
  """A compiled step that needs more memory per device than the device has."""


class DivergedError(MoejaxError):
  """A training step whose loss or gradient norm is not finite, or absurdly large."""


class WorkdirInUse(MoejaxError):
  """Another live run owns the run directory."""
