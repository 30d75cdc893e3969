"""Benchmark: step time, throughput, MFU, memory, collective bytes, balance, pipeline bubble.

  python -m moejax.bench --config=configs/tp4pp4.py:tiny --out=/tmp/bench.json
  python -m moejax.bench --config=configs/tp4pp4.py:tiny --micro_batches=4,8,16,32 --out=sweep.json

Times the configured mesh and the same model and global batch on a 1x1 mesh, interleaved in one
process; MFU is model FLOP/s over the matmul rate measured here on the same devices.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).')
flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
flags.DEFINE_integer('steps', 5, 'Timed steps per round.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds (configured mesh, then 1x1).')
flags.DEFINE_string('micro_batches', '', 'Comma-separated M values to sweep (same micro-batch).')
flags.mark_flags_as_required(['config'])


def flops_per_token(config) -> float:
  """Training FLOPs per token: 6 x active matmul params + attention (PaLM appendix B)."""
  m, moe, t = config.model, config.moe, config.data.seq_len
  d, nh = m.d_model, m.num_heads * m.head_dim
  per_block = 4 * d * nh + d * moe.num_experts + moe.top_k * 2 * d * moe.d_ff
  active = m.num_blocks * per_block + d * m.vocab_size          # blocks + LM head
  return 6 * active + 12 * m.num_blocks * nh * t


def matmul_flops_per_s(devices) -> float:
  """Measured float32 matmul rate of `devices` working at once (one matmul per device)."""
  import jax
  import jax.numpy as jnp
  n = 512
  xs = [jax.device_put(jnp.ones((n, n), jnp.float32), d) for d in devices]
  f = jax.jit(lambda a: a @ a)
  for x in xs:
    f(x).block_until_ready()
  reps = 10
  start = time.perf_counter()
  for _ in range(reps):
    outs = [f(x) for x in xs]
  jax.block_until_ready(outs)
  return 2 * n ** 3 * reps * len(devices) / (time.perf_counter() - start)


class _Runner:
  """A compiled train step of one config, with its own state and a fixed batch."""

  def __init__(self, config):
    import jax
    from moejax import config as config_lib
    from moejax.parallel import hlo, mesh as mesh_lib
    from moejax.train import loop, optimizer, state as state_lib, step as step_lib
    cfg, lay = config_lib.model_config(config), config_lib.layout(config)
    self.lay = lay
    mesh = mesh_lib.mesh_for(lay)
    tx = optimizer.make(config.optim)
    sh = state_lib.shardings(cfg, lay, tx, mesh)
    self.state = state_lib.create(cfg, lay, tx, mesh, config.seed)
    self.step_fn = step_lib.make_train_step(cfg, lay, tx, optimizer.schedule(config.optim), mesh,
                                            sh, config.seed)
    self.batch = jax.device_put(loop.make_source(config).batch(0), step_lib.batch_sharding(mesh))
    compiled = self.step_fn.lower(self.state, self.batch).compile()
    self.collective_bytes = hlo.bytes_by_kind(compiled.as_text())
    mem = compiled.memory_analysis()
    self.memory = {k: int(getattr(mem, k + '_size_in_bytes', 0)) for k in
                   ('argument', 'output', 'temp', 'generated_code')} if mem else {}
    self.metrics = None

  def time(self, steps: int) -> float:
    import jax
    self.state, self.metrics = self.step_fn(self.state, self.batch)   # not timed
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / steps


def measure(config, steps: int, rounds: int) -> dict:
  import jax
  import numpy as np
  from moejax.parallel import pipeline as pipeline_lib
  from moejax.train import metrics as metrics_lib
  ref_config = config.copy_and_resolve_references()
  ref_config.mesh.tp = ref_config.mesh.pp = 1
  ref_config.pipeline.repeats = 1
  main, ref = _Runner(config), _Runner(ref_config)
  times, ref_times = [], []
  for _ in range(rounds):
    times.append(main.time(steps))
    ref_times.append(ref.time(steps))
  step_time, ref_time = float(np.median(times)), float(np.median(ref_times))
  lay = main.lay
  m = jax.device_get(main.metrics)
  kept = np.asarray(m['expert_load'])
  devices = lay.tp * lay.pp
  peak = matmul_flops_per_s(jax.devices()[:devices])
  fpt = flops_per_token(config)
  tps = lay.tokens_per_step / step_time
  formula = pipeline_lib.bubble_fraction(lay.pp, lay.repeats, lay.num_micro_batches)
  return {
      'mesh': f'{lay.tp}x{lay.pp}', 'repeats': lay.repeats, 'micro_batches': lay.num_micro_batches,
      'devices': devices, 'platform': jax.devices()[0].platform,
      'step_time_s': step_time, 'step_time_1x1_s': ref_time,
      'ratio_vs_1x1': step_time / ref_time,
      'tokens_per_sec': tps, 'flops_per_token': fpt,
      'mfu': fpt * tps / peak, 'peak_flops': peak,
      'peak_flops_source': f'float32 {512}x{512} matmul measured now on the same {devices} '
                           f'{jax.devices()[0].platform} devices',
      'memory_per_device_bytes': main.memory, 'collective_bytes': main.collective_bytes,
      'dropped_frac': float(m['dropped_frac']),
      'tokens_per_expert': {'min': float(kept.min()), 'mean': float(kept.mean()),
                            'max': float(kept.max())},
      'balance': metrics_lib.expert_balance(kept),
      # The same work with pp=1 takes ref_time; idle ticks add (ratio - 1) / ratio of the time.
      'bubble_measured': 1.0 - ref_time / step_time, 'bubble_formula': formula,
      'idle_tick_factor': 1.0 / (1.0 - formula),
  }


def main(argv):
  del argv
  from moejax import runtime
  config = flags.FLAGS.config
  runtime.setup_devices(config)
  sweep = [int(x) for x in flags.FLAGS.micro_batches.split(',') if x]
  results = []
  for m in sweep or [config.data.num_micro_batches]:
    c = config.copy_and_resolve_references()
    c.data.num_micro_batches = m
    r = measure(c, flags.FLAGS.steps, flags.FLAGS.rounds)
    results.append(r)
    print(f"{r['mesh']} r={r['repeats']} M={m:>3d}: step {r['step_time_s']:.3f}s, 1x1 "
          f"{r['step_time_1x1_s']:.3f}s, ratio {r['ratio_vs_1x1']:.3f} (idle-tick factor "
          f"{r['idle_tick_factor']:.3f}), bubble measured {r['bubble_measured']:.3f} formula "
          f"{r['bubble_formula']:.3f}, {r['tokens_per_sec']:,.0f} tok/s, MFU {r['mfu']:.3f}, "
          f"dropped {r['dropped_frac']:.3f}, balance {r['balance']:.2f}", flush=True)
  print(json.dumps(results if sweep else results[0], indent=1))
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(results if sweep else results[0], f, indent=1)


if __name__ == '__main__':
  app.run(main)
