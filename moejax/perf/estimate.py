"""A step's time on a GPU card, estimated from its compiled program: the matmul FLOPs it executes
at the card's bf16 rate, and its collectives' traffic at the bandwidth of the links they cross
(NVLink inside a host, the network between hosts). Collectives with compute scheduled between
their start and done hide behind it; the rest add their whole time. An estimate at peak rates:
it ranks layouts, it does not predict a measured step."""
from __future__ import annotations

from collections.abc import Sequence

from moejax.perf import hlo

# Bytes each device sends per byte of a collective's result, for a group of n devices (the
# ring / pairwise algorithms NCCL uses): an all-reduce sends its data twice (reduce-scatter,
# then all-gather), a reduce-scatter's result is 1/n of what each device contributes.
WIRE_PER_RESULT_BYTE = {
    'all-reduce': lambda n: 2 * (n - 1) / n,
    'all-gather': lambda n: (n - 1) / n,
    'reduce-scatter': lambda n: n - 1,
    'all-to-all': lambda n: (n - 1) / n,
    'ragged-all-to-all': lambda n: (n - 1) / n,
    'collective-permute': lambda n: 1.0,
}


def link_seconds(c: hlo.Collective, host_of: Sequence[int], rates) -> tuple[float, bool]:
  """(seconds, crosses hosts) of one collective's executions per step: the bytes a device sends
  at NVLink's rate, or the network's when any of its groups spans hosts."""
  groups = c.groups or (tuple(range(len(host_of))),)
  if c.kind == 'collective-permute':
    groups = tuple(g for g in groups if len(g) == 2 and g[0] != g[1])
  size = max((len(g) for g in groups), default=1)
  if size < 2:
    return 0.0, False
  crosses = any(len({host_of[d] for d in g}) > 1 for g in groups)
  rate = rates.network_bytes_per_s if crosses else rates.nvlink_bytes_per_s
  return c.bytes * c.count * WIRE_PER_RESULT_BYTE[c.kind](size) / rate, crosses


def step_time(hlo_text: str, flops_executed: float, host_of: Sequence[int], rates) -> dict:
  """Estimated seconds per step and its parts; host_of[i]: the host of the program's partition
  i (its mesh's devices in order)."""
  compute = flops_executed / rates.bf16_flops_per_s
  overlapped = exposed = between_hosts = 0.0
  for c in hlo.collectives(hlo_text):
    seconds, crosses = link_seconds(c, host_of, rates)
    between_hosts += seconds if crosses else 0.0
    if c.overlapped:
      overlapped += seconds
    else:
      exposed += seconds
  return {'step_s': max(compute, overlapped) + exposed, 'matmul_s': compute,
          'collective_overlapped_s': overlapped, 'collective_exposed_s': exposed,
          'collective_between_hosts_s': between_hosts}


def time_model(hlo_text: str, host_of: Sequence[int], card: str, model_flops: float) -> dict:
  """A compiled GPU program's predicted step on `card`: its kernels by op class
  (moejax.perf.opclass, calibrated by the card's last measured run) and its collectives at the
  links' bandwidth, those with compute scheduled between start and done hidden behind the
  kernels up to their time. model_flops: the model's FLOPs per device per step."""
  from moejax import targets
  from moejax.perf import calibration, opclass
  rates = targets.rates(card)
  kernels = opclass.predict(hlo_text, rates, calibration.ratios(card))
  links = step_time(hlo_text, 0.0, host_of, rates)
  compute = kernels['predicted_step_s']
  hidden = min(links['collective_overlapped_s'], compute)
  exposed = links['collective_exposed_s'] + links['collective_overlapped_s'] - hidden
  step = compute + exposed
  return {'predicted_step_s': step, 'kernels_s': compute, 'predicted_mfu': model_flops / step / rates.bf16_flops_per_s,
          'predicted_s_by_class': dict(kernels['predicted_s_by_class'],
                                       collectives_exposed=exposed),
          'collectives_overlapped_s': hidden,
          'collective_between_hosts_s': links['collective_between_hosts_s'],
          'kernel_launches': kernels['kernel_launches'],
          'calibration': calibration.source(card) or 'none (rooflines only)'}
