"""The layouts of a config for its device count, each compiled for a GPU card and ranked by its
estimated step time (perf/estimate), with the memory check against the card.

The candidate set is pruned: every dp x tp x pp split of the devices with tp inside one host
(tensor parallelism is all-reduce- and all-to-all-bound), circular repeats 1 and 2 where the
stages hold 2 or more blocks, experts split over dp x tp whenever dp > 1 (replicating every
expert over dp only adds memory and a gradient all-reduce of the experts across dp), the step's
sequences cut into the config's micro-batches or into as few as pp or 2 x pp larger ones (the
global batch, and so the training, unchanged: fewer pipeline ticks launch fewer kernels, for a
larger bubble), and the config's remat policy, with 'nothing_saveable' tried for a layout where
that does not fit.
Splits the config cannot take (heads, experts, micro-batch rows) are skipped by validation,
before compiling.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from moejax import config as config_lib
from moejax import targets
from moejax.errors import ConfigError

FALLBACK_REMAT = 'nothing_saveable'


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _micro_batches(config: ml_collections.ConfigDict, pp: int) -> list[int]:
  """Micro-batches per step to try with pp stages: the config's, pp and 2 x pp where fewer
  and where they cut the step's sequences evenly."""
  m = config.data.num_micro_batches
  rows = m * config.data.micro_batch_size
  return sorted({n for n in (m, pp, 2 * pp) if n <= m and rows % n == 0}, reverse=True)


def candidates(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Overrides of the mesh, pipeline and micro-batch keys, one per candidate layout (same
  device count, same sequences per step); experts and Adam moments split over dp where dp > 1."""
  devices = config_lib.mesh_shape(config).devices
  blocks = config.model.num_blocks
  rows = config.data.num_micro_batches * config.data.micro_batch_size
  for tp in _divisors(devices):
    if tp > targets.GPUS_PER_HOST:
      continue
    for pp in _divisors(devices // tp):
      if blocks % pp:
        continue
      for repeats in (1, 2) if pp > 1 and blocks % (2 * pp) == 0 else (1,):
        dp = devices // (tp * pp)
        for m in _micro_batches(config, pp):
          # ZeRO-1 wherever dp > 1: the same bytes (reduce-scatter + all-gather for all-reduce),
          # 1/dp of the optimizer's HBM traffic and memory (16x1x1: 30.50 -> 30.09 ms; 4x1x4
          # M4: 55.05 -> 54.63 ms on 16 H100s, BENCHMARKS.md)
          yield {'mesh.dp': dp, 'mesh.tp': tp, 'mesh.pp': pp, 'mesh.experts_over_dp': dp > 1,
                 'mesh.shard_optimizer': dp > 1, 'pipeline.repeats': repeats,
                 'data.num_micro_batches': m, 'data.micro_batch_size': rows // m}


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def name(overrides: dict[str, Any]) -> str:
  """A layout as `dp x tp x pp r<repeats> M<micro-batches>`, with its remat policy if
  overridden."""
  o = overrides
  text = (f"{o['mesh.dp']}x{o['mesh.tp']}x{o['mesh.pp']} r{o['pipeline.repeats']} "
          f"M{o['data.num_micro_batches']}")
  return text + (f" {o['pipeline.remat_policy']}" if 'pipeline.remat_policy' in o else '')


def evaluate(config, overrides: dict[str, Any], target: str) -> dict[str, Any]:
  """One candidate compiled for `target`: its estimate, memory against the card, FLOPs and
  collective bytes."""
  from moejax.perf import aot, estimate
  rates = targets.rates(target)
  result = aot.compiled_analysis(with_overrides(config, overrides), target)
  text = result.pop('compiled').as_text()
  time = estimate.step_time(text, result['flops_executed'], result['mesh_hosts'], rates)
  model = estimate.time_model(text, result['mesh_hosts'], target,
                              result['flops_model_per_device'])
  peak = result['memory_per_device_bytes']['peak']
  return {'layout': name(overrides), 'overrides': overrides, 'estimate': time,
          'time_model': model, 'step_s_estimate': model['predicted_step_s'],
          'predicted_mfu': model['predicted_mfu'], 'peak_bytes': peak,
          'fits': peak <= rates.memory_bytes, 'card_memory_bytes': rates.memory_bytes,
          'flops_executed_over_model': result['flops_executed_over_model'],
          'collective_bytes': sum(result['collective_bytes'].values()),
          'collective_ratio_vs_min': result['collective_ratio_vs_min'],
          'collective_overlap_frac': result['collective_overlap_frac'],
          'compile_s': result['compile_s']}


def search(config, target: str, report: Callable[[dict], None] = lambda r: None
           ) -> list[dict[str, Any]]:
  """Every candidate layout compiled for `target`, ranked: those that fit the card first, by
  the time model's predicted step (moejax.perf.estimate.time_model). `report` sees each
  result as it is made (or each skipped layout)."""
  from moejax import validation
  if target not in targets.GPUS:
    raise ConfigError(f'--search ranks layouts by a GPU card\'s rates; add --target=one of '
                      f'{", ".join(targets.GPUS)} (--aot compiles for it here, no GPU needed).')
  results = []
  for overrides in candidates(config):
    try:
      validation.validate(with_overrides(config, overrides))
    except ConfigError as e:
      report({'layout': name(overrides), 'skipped': str(e).splitlines()[-1].strip(' -')})
      continue
    result = evaluate(config, overrides, target)
    if not result['fits'] and config.pipeline.remat_policy != FALLBACK_REMAT:
      report(result)
      result = evaluate(config, {**overrides, 'pipeline.remat_policy': FALLBACK_REMAT}, target)
    report(result)
    results.append(result)
  return sorted(results, key=lambda r: (not r['fits'], r['step_s_estimate']))
