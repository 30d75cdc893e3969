"""Benchmark: step time, throughput, MFU, memory, collective bytes, balance, pipeline bubble.

  python -m moejax.bench --config=configs/tp4pp4.py:tiny --out=/tmp/bench.json
  python -m moejax.bench --config=configs/tp4pp4.py:tiny --micro_batches=4,8,16,32 --out=sweep.json
  python -m moejax.bench --config=configs/tp4pp4.py --aot --out=full_aot.json   # nothing allocated
  python -m moejax.bench --config=configs/tp4pp4.py --aot --target=h100 --search --out=rank.json

Times the configured mesh and the same model and global batch on a 1x1 mesh, interleaved in one
process; MFU is model FLOP/s over the matmul rate measured here on the same devices. --aot only
lowers and compiles the train step from abstract inputs and reports per-device memory and
collective bytes (against the layout's analytic minimum) of the compiled program; with
--search it compiles every candidate layout of the config's device count for a GPU card and
ranks them by an estimated step time. The figures are computed in moejax/perf (aot.py,
speed.py, search.py, estimate.py); this module parses flags and prints.
"""
from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).')
flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
flags.DEFINE_integer('steps', 5, 'Timed steps per round.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds (configured mesh, then 1x1).')
flags.DEFINE_string('micro_batches', '', 'Comma-separated M values to sweep (same micro-batch).')
flags.DEFINE_bool('aot', False, 'Compile only (abstract inputs): memory and collectives.')
flags.DEFINE_enum('target', 'cpu', ['cpu', 'h100', 'a100', 'h200'],
                  'With --aot: compile for this machine (cpu) or for abstract GPUs of this card '
                  '(needs requirements-cuda12.txt, not a GPU).')
flags.DEFINE_bool('search', False, 'With --aot and a GPU --target: compile the candidate '
                  'layouts (dp x tp x pp, circular repeats, remat fallback) of the config\'s '
                  'device count and rank them by estimated step time.')
flags.DEFINE_string('hlo_out', None, 'With --aot: also write the compiled HLO text here.')
flags.DEFINE_bool('decode', False, 'Generation speed instead of training: tokens/s with and '
                  'without the KV cache, and one decode step\'s latency.')
flags.DEFINE_bool('stop_vote', False, 'Step time with and without the multi-process stop vote '
                  'at every step boundary (interleaved rounds).')
flags.DEFINE_integer('prompt_len', 64, 'With --decode: prompt tokens.')
flags.DEFINE_integer('new_tokens', 448, 'With --decode: generated tokens.')
flags.mark_flags_as_required(['config'])

FLAGS = flags.FLAGS


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  from moejax import runtime
  from moejax import targets
  from moejax.errors import ConfigError, MoejaxError
  config = FLAGS.config
  try:
    if FLAGS.target != 'cpu' and not FLAGS.aot:
      raise ConfigError(f'--target={FLAGS.target} compiles for GPUs that are not here; '
                        f'add --aot (only a GPU gives times).')
    if FLAGS.search and not (FLAGS.aot and FLAGS.target in targets.GPUS):
      raise ConfigError('--search compiles layouts for a GPU card and ranks them by its rates; '
                        'use it with --aot --target=h100 (or a100, h200).')
    targets.prepare(FLAGS.target)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  runtime.setup_devices(config)
  if FLAGS.search:
    _search(config)
  elif FLAGS.aot:
    _aot(config)
  elif FLAGS.decode:
    from moejax.perf import speed
    result = speed.decode_speed(config, FLAGS.prompt_len, FLAGS.new_tokens)
    print(json.dumps(result, indent=1), flush=True)
    _write(result)
  elif FLAGS.stop_vote:
    from moejax.perf import speed
    result = speed.stop_vote_cost(config, FLAGS.steps, FLAGS.rounds)
    print(f"{result['mesh']}: step {result['step_time_s']:.4f}s, with the stop vote "
          f"{result['step_time_with_vote_s']:.4f}s ({result['vote_cost_frac']:+.2%})", flush=True)
    _write(result)
  else:
    _train_speed(config)


def _train_speed(config) -> None:
  from moejax.perf import speed
  sweep = [int(x) for x in FLAGS.micro_batches.split(',') if x]
  results = []
  for m in sweep or [config.data.num_micro_batches]:
    c = config.copy_and_resolve_references()
    c.data.num_micro_batches = m
    r = speed.measure(c, FLAGS.steps, FLAGS.rounds)
    results.append(r)
    print(f"{r['mesh']} r={r['repeats']} M={m:>3d}: step {r['step_time_s']:.3f}s, 1x1 "
          f"{r['step_time_1x1_s']:.3f}s, ratio {r['ratio_vs_1x1']:.3f} (idle-tick factor "
          f"{r['idle_tick_factor']:.3f}), bubble measured {r['bubble_measured']:.3f} formula "
          f"{r['bubble_formula']:.3f}, {r['tokens_per_sec']:,.0f} tok/s, MFU {r['mfu']:.3f}, "
          f"dropped {r['dropped_frac']:.3f}, balance {r['balance']:.2f}", flush=True)
  print(json.dumps(results if sweep else results[0], indent=1))
  _write(results if sweep else results[0])


def _aot(config) -> None:
  import jax
  from moejax import targets
  from moejax.perf import aot
  target = FLAGS.target
  result = aot.compiled_analysis(config, target)
  compiled = result.pop('compiled')
  if FLAGS.hlo_out:
    with open(FLAGS.hlo_out, 'w') as f:
      f.write(compiled.as_text())
  if target != 'cpu':
    from moejax import config as config_lib
    from moejax.parallel import pipeline as pipeline_lib
    from moejax.perf import estimate
    model = estimate.time_model(compiled.as_text(), result['mesh_hosts'], target,
                                result['flops_model_per_device'])
    lay = config_lib.layout(config)
    # Idle ticks run the stages too: the bubble's share of the ticks is its share of the time
    # the ticks take (the kernels less the embedding, head and update, counted in with them).
    model['pipeline_bubble_frac'] = pipeline_lib.bubble_fraction(lay.pp, lay.repeats,
                                                                 lay.num_micro_batches)
    model['pipeline_bubble_s_at_most'] = model['pipeline_bubble_frac'] * model['kernels_s']
    result['time_model'] = model
  result.update(mesh=f'{config.mesh.tp}x{config.mesh.pp}', dtype=config.model.dtype,
                platform=jax.devices()[0].platform if target == 'cpu' else 'cuda',
                target=jax.devices()[0].device_kind if target == 'cpu' else
                targets.card_name(target))
  _print_aot(result)
  if result['platform'] == 'cpu' and config.model.dtype != 'float32':
    print('  note: XLA:CPU computes reduced-precision matmuls and reductions in float32, so '
          'collectives may be counted at 4 bytes where a GPU moves 2.')
  _write(result)


def _search(config) -> None:
  from moejax import config as config_lib
  from moejax.perf import search
  ranked = search.search(config, FLAGS.target, report=_print_candidate)
  print(f'\nLayouts for {config_lib.mesh_shape(config).devices} x '
        f'{FLAGS.target}, best first (the time model: kernels by op class at the card\'s rates, '
        f'calibrated on its last measured run; collectives at NVLink / network bandwidth, hidden '
        f'where the schedule overlaps them):')
  for rank, r in enumerate(ranked, 1):
    print(f'{rank:3d}. {_candidate_line(r)}')
  _write(ranked)


def _candidate_line(r: dict) -> str:
  e = r['estimate']
  m = r['time_model']
  return (f"{r['layout']:34s} step ~{m['predicted_step_s'] * 1e3:8.2f} ms, MFU "
          f"{m['predicted_mfu']:.1%} (kernels {m['kernels_s'] * 1e3:.2f}, exposed collectives "
          f"{m['predicted_s_by_class']['collectives_exposed'] * 1e3:.2f}, between hosts "
          f"{e['collective_between_hosts_s'] * 1e3:.2f}; matmuls at peak "
          f"{e['matmul_s'] * 1e3:.2f}) | peak {r['peak_bytes'] / 2**30:5.1f} GiB"
          f"{'' if r['fits'] else ' DOES NOT FIT'} | FLOPs {r['flops_executed_over_model']:.3f}x "
          f"| collectives {r['collective_bytes'] / 2**30:.2f} GiB "
          f"({r['collective_ratio_vs_min']:.2f}x min)")


def _print_candidate(r: dict) -> None:
  if 'skipped' in r:
    print(f"  {r['layout']:34s} skipped: {r['skipped']}", flush=True)
  else:
    print(f"  {_candidate_line(r)} [compiled in {r['compile_s']:.0f}s]", flush=True)


def _print_aot(result: dict) -> None:
  gib = lambda n: f'{n / 2**30:8.3f} GiB'
  print(f"compiled {result['mesh']} train step ({result['dtype']}) for {result['platform']} in "
        f"{result['compile_s']:.1f}s; per device:")
  for k, v in result['memory_per_device_bytes'].items():
    print(f'  memory {k:42s} {gib(v)}')
  for k, v in result['collective_bytes'].items():
    print(f"  {k:20s} compiled {gib(v)}   analytic minimum "
          f"{gib(result['collective_bytes_min'].get(k, 0))}")
  print(f"  collective bytes vs analytic minimum: {result['collective_ratio_vs_min']:.2f}x")
  print(f"  collective bytes with compute scheduled between start and done: "
        f"{result['collective_overlap_frac']:.1%}")
  print(f"  matmul FLOPs executed {result['flops_executed']:.4g} = "
        f"{result['flops_executed_over_model']:.3f}x the model's "
        f"{result['flops_model_per_device']:.4g}; excess: " + ', '.join(
            f'{k} {v:.3g}' for k, v in result['flops_excess'].items()))
  if 'time_model' in result:
    t = result['time_model']
    print(f"  predicted step {t['predicted_step_s'] * 1e3:.2f} ms, MFU {t['predicted_mfu']:.1%} "
          f"(calibration: {t['calibration']}); by class: " + ', '.join(
              f'{k} {v * 1e3:.2f} ms' for k, v in t['predicted_s_by_class'].items()))
    print(f"  pipeline bubble {t['pipeline_bubble_frac']:.1%} of the ticks: at most "
          f"{t['pipeline_bubble_s_at_most'] * 1e3:.2f} ms of the kernels")


def _write(result) -> None:
  from moejax.cli import console
  console.write_json(FLAGS.out, result)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__, flags_parser=console.parse_flags)


if __name__ == '__main__':
  run()
