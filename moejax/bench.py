"""Benchmark: step time, throughput, MFU, memory, collective bytes, balance, pipeline bubble.

  python -m moejax.bench --config=configs/tp4pp4.py:tiny --out=/tmp/bench.json
  python -m moejax.bench --config=configs/tp4pp4.py:tiny --micro_batches=4,8,16,32 --out=sweep.json
  python -m moejax.bench --config=configs/tp4pp4.py --aot --out=full_aot.json   # nothing allocated

Times the configured mesh and the same model and global batch on a 1x1 mesh, interleaved in one
process; MFU is model FLOP/s over the matmul rate measured here on the same devices. --aot only
lowers and compiles the train step from abstract inputs and reports per-device memory and
collective bytes (against the layout's analytic minimum) of the compiled program.
"""
from __future__ import annotations

import json
import sys
import time

from absl import flags
from ml_collections import config_flags

from moejax.model import flops as model_flops

config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).')
flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
flags.DEFINE_integer('steps', 5, 'Timed steps per round.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds (configured mesh, then 1x1).')
flags.DEFINE_string('micro_batches', '', 'Comma-separated M values to sweep (same micro-batch).')
flags.DEFINE_bool('aot', False, 'Compile only (abstract inputs): memory and collectives.')
flags.DEFINE_enum('target', 'cpu', ['cpu', 'h100', 'a100', 'h200'],
                  'With --aot: compile for this machine (cpu) or for abstract GPUs of this card '
                  '(needs requirements-cuda12.txt, not a GPU).')
flags.DEFINE_string('hlo_out', None, 'With --aot: also write the compiled HLO text here.')
flags.DEFINE_bool('decode', False, 'Generation speed instead of training: tokens/s with and '
                  'without the KV cache, and one decode step\'s latency.')
flags.DEFINE_integer('prompt_len', 64, 'With --decode: prompt tokens.')
flags.DEFINE_integer('new_tokens', 448, 'With --decode: generated tokens.')
flags.mark_flags_as_required(['config'])


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


def compiled_analysis(config, target: str = 'cpu', plan=None) -> dict:
  """Per-device memory and collective bytes of the train step compiled from abstract inputs,
  for this machine's devices or (target='h100', ...) for abstract GPUs of that card."""
  import jax
  import numpy as np
  from moejax import targets
  from moejax.perf import comm, hlo
  from moejax.train.plan import Plan
  plan = plan or Plan(config)
  if target != 'cpu':
    # Nothing can execute on abstract GPUs (not even optax's init inside eval_shape): the plan
    # is made on the CPU mesh of the same shape, then moved to the GPU mesh.
    plan = plan.on(targets.devices(target, plan.layout.devices))
  cfg, lay, abstract_state = plan.model, plan.layout, plan.abstract_state
  start = time.perf_counter()
  compiled = plan.train_step().lower(abstract_state, plan.batch_abstract()).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k + '_size_in_bytes', 0)) for k in
            ('argument', 'output', 'alias', 'temp', 'generated_code')} if mem else {}

  def local_bytes(tree) -> int:   # bytes of one device's shard of every leaf
    return int(sum(np.prod(l.sharding.shard_shape(l.shape)) * l.dtype.itemsize
                   for l in jax.tree.leaves(tree)))
  memory['params'] = local_bytes(abstract_state.params)
  memory['optimizer_state'] = local_bytes(abstract_state.opt_state)
  memory['gradients (in temp)'] = memory['params']
  memory['activations and workspace (rest of temp)'] = memory.get('temp', 0) - memory['params']
  memory['peak'] = (memory.get('argument', 0) + memory.get('output', 0) -
                    memory.get('alias', 0) + memory.get('temp', 0))
  minimum = comm.minimum_bytes(cfg, lay)
  text = compiled.as_text()
  collective = hlo.bytes_by_kind(text)
  return {'compile_s': compile_s, 'memory_per_device_bytes': memory,
          **executed_flops(config, text),
          'collective_overlap_frac': hlo.overlap_fraction(text),
          'collective_bytes': collective, 'collective_bytes_min': comm.totals(minimum),
          'collective_bytes_min_terms': minimum,
          'collective_ratio_vs_min': sum(collective.values()) / max(
              sum(comm.totals(minimum).values()), 1),
          'compiled': compiled}


def executed_flops(config, hlo_text: str) -> dict:
  """Matmul FLOPs the compiled program executes per device per step, against the model's
  (flops_per_token x tokens / devices), and what the excess is made of."""
  from moejax import config as config_lib
  from moejax.parallel import pipeline as pipeline_lib
  from moejax.perf import hlo
  lay = config_lib.layout(config)
  parts = hlo.flops(hlo_text)
  model = model_flops.flops_per_token(config) * lay.tokens_per_step / lay.devices
  bubble = pipeline_lib.bubble_fraction(lay.pp, lay.repeats, lay.num_micro_batches)
  excess = parts['total'] - model
  ticks = bubble * (parts['blocks'] + parts['remat'])   # idle ticks run the blocks too
  remat = (1 - bubble) * parts['remat']
  cfg = config_lib.model_config(config)
  expert = 6 * cfg.top_k * 2 * cfg.d_model * cfg.d_ff * cfg.num_blocks * (
      lay.tokens_per_step / lay.devices)                # expert FLOPs the model needs
  if cfg.dispatch == 'dropless':
    # XLA (jaxlib 0.10) lowers ragged_dot to a dense dot: every local expert multiplies every row
    # of the worst-case receive buffer (expert_shards x the shard's K*S rows).
    slots, slot_term = (cfg.num_experts - 1) * expert, 'ragged_dot_dense_lowering'
  else:   # experts run on every capacity slot, used or not: E * C slots for K * S assignments
    slots = (cfg.num_experts * cfg.capacity(True) / (cfg.top_k * cfg.group_size) - 1) * expert
    slot_term = 'empty_capacity_slots'
  return {
      'flops_executed': parts['total'], 'flops_model_per_device': model,
      'flops_executed_over_model': parts['total'] / model,
      'flops_executed_by_part': parts,
      'flops_excess': {'bubble_ticks': ticks, 'rematerialisation': remat, slot_term: slots,
                       'other': excess - ticks - remat - slots},
  }


class _Runner:
  """A compiled train step (and forward pass) of one config, with its own state and batch."""

  def __init__(self, config):
    from moejax.data.source import global_batch
    from moejax.train import loop
    from moejax.train.plan import Plan
    plan = Plan(config)
    self.lay = plan.layout
    self.analysis = compiled_analysis(config, plan=plan)
    self.step_fn = self.analysis.pop('compiled')
    self.state = plan.create_state()
    self.batch = global_batch(loop.make_source(plan), 0, plan.batch_sharding)
    self.forward_fn = plan.eval_step()
    self.metrics = None

  def time_forward(self, steps: int) -> float:
    """Seconds per forward pass (no backward) of the whole batch through the whole model."""
    import jax
    jax.block_until_ready(self.forward_fn(self.state.params, self.batch))
    start = time.perf_counter()
    for _ in range(steps):
      out = self.forward_fn(self.state.params, self.batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps

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
  ref_config.mesh.tp = ref_config.mesh.pp = ref_config.mesh.dp = 1
  ref_config.pipeline.repeats = 1
  # Forward latency of one micro-batch per stage: the smallest batch the schedule takes.
  lat_config = config.copy_and_resolve_references()
  lat_config.data.num_micro_batches = config.mesh.pp
  main, ref, lat = _Runner(config), _Runner(ref_config), _Runner(lat_config)
  times, ref_times = [], []
  for _ in range(rounds):
    times.append(main.time(steps))
    ref_times.append(ref.time(steps))
  step_time, ref_time = float(np.median(times)), float(np.median(ref_times))
  forward_step = main.time_forward(steps)
  forward_latency = lat.time_forward(steps)
  lay = main.lay
  m = jax.device_get(main.metrics)
  kept = np.asarray(m['expert_load'])
  devices = lay.devices
  peak = matmul_flops_per_s(jax.devices()[:devices])
  fpt = model_flops.flops_per_token(config)
  tps = lay.tokens_per_step / step_time
  formula = pipeline_lib.bubble_fraction(lay.pp, lay.repeats, lay.num_micro_batches)
  return {
      'mesh': f'{lay.tp}x{lay.pp}' + (f' dp={lay.dp}' if lay.dp > 1 else ''), 'repeats': lay.repeats, 'micro_batches': lay.num_micro_batches,
      'devices': devices, 'platform': jax.devices()[0].platform,
      'step_time_s': step_time, 'step_time_1x1_s': ref_time,
      'forward_latency_s': forward_latency, 'forward_step_s': forward_step,
      'ratio_vs_1x1': step_time / ref_time,
      'tokens_per_sec': tps, 'flops_per_token': fpt,
      'mfu': fpt * tps / peak, 'peak_flops': peak,
      'peak_flops_source': f'float32 {512}x{512} matmul measured now on the same {devices} '
                           f'{jax.devices()[0].platform} devices',
      **main.analysis,
      'dropped_frac': float(m['dropped_frac']),
      'tokens_per_expert': {'min': float(kept.min()), 'mean': float(kept.mean()),
                            'max': float(kept.max())},
      'balance': metrics_lib.expert_balance(m['expert_assigned']),
      # The same work with pp=1 takes ref_time; idle ticks add (ratio - 1) / ratio of the time.
      'bubble_measured': 1.0 - ref_time / step_time, 'bubble_formula': formula,
      'idle_tick_factor': 1.0 / (1.0 - formula),
  }


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  from moejax import runtime
  from moejax import targets
  from moejax.errors import ConfigError, MoejaxError
  config = flags.FLAGS.config
  try:
    if flags.FLAGS.target != 'cpu' and not flags.FLAGS.aot:
      raise ConfigError(f'--target={flags.FLAGS.target} compiles for GPUs that are not here; '
                        f'add --aot (only a GPU gives times).')
    targets.prepare(flags.FLAGS.target)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  runtime.setup_devices(config)
  if flags.FLAGS.aot:
    _aot(config)
    return
  if flags.FLAGS.decode:
    _write(decode_speed(config, flags.FLAGS.prompt_len, flags.FLAGS.new_tokens))
    return
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


def decode_speed(config, prompt_len: int, new_tokens: int) -> dict:
  """Greedy generation of `new_tokens` after a `prompt_len` prompt, one sequence, on the config's
  tp (pp=1: one stage-group): with the KV cache and with the windowed re-run of data.seq_len."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax import generate as gen
  from moejax.model import decode, params as params_lib
  from moejax.perf.timing import timed
  from moejax.train.plan import Plan
  c = config.copy_and_resolve_references()
  c.mesh.update(pp=1, dp=1, experts_over_dp=False)
  c.pipeline.repeats = 1
  c.data.update(num_micro_batches=1, micro_batch_size=1, source='random')
  plan = Plan(c, jax.devices()[:c.mesh.tp])
  params, greedy = plan.init_params(), gen.Sampling()
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, plan.model.vocab_size, (1, prompt_len)),
                       jnp.int32)
  key = jax.random.key(0)
  cached = gen.cached_program(plan, prompt_len, new_tokens, greedy)
  cached_s = timed(cached, params, prompt, key)
  window = np.zeros((1, 1, plan.layout.seq_len), np.int32)
  window[0, 0, :prompt_len] = np.asarray(prompt)[0]
  window = jax.device_put(window, plan.batch_sharding)
  windowed_s = timed(gen.windowed_program(plan, prompt_len, new_tokens, greedy),
                     params, window, key)
  cfg, length = plan.model, prompt_len + new_tokens
  step = plan.jit(lambda p, cache, tok, at: decode.extend(p, cache, tok, at, cfg=cfg))
  canonical = plan.jit(params_lib.tree_from_stages)(params)
  cache = plan.jit(lambda: decode.empty_cache(cfg, 1, length))()
  _, cache = step(canonical, cache, prompt, jnp.int32(0))                # prefill
  token = prompt[:, -1:]
  step_s = timed(step, canonical, cache, token, jnp.int32(prompt_len), steps=20)
  prefill_s = timed(step, canonical, cache, prompt, jnp.int32(0), steps=3)
  return {'mesh': f'tp={c.mesh.tp} pp=1', 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'window': plan.layout.seq_len,
          'decode_tokens_per_sec': new_tokens / cached_s,
          'decode_tokens_per_sec_no_cache': new_tokens / windowed_s,
          'cache_speedup': windowed_s / cached_s,
          'decode_step_latency_s': step_s, 'prefill_latency_s': prefill_s,
          'generation_s': cached_s, 'generation_no_cache_s': windowed_s}


def _aot(config) -> None:
  import jax
  from moejax import targets
  target = flags.FLAGS.target
  result = compiled_analysis(config, target)
  compiled = result.pop('compiled')
  if flags.FLAGS.hlo_out:
    with open(flags.FLAGS.hlo_out, 'w') as f:
      f.write(compiled.as_text())
  result.update(mesh=f'{config.mesh.tp}x{config.mesh.pp}', dtype=config.model.dtype,
                platform=jax.devices()[0].platform if target == 'cpu' else 'cuda',
                target=jax.devices()[0].device_kind if target == 'cpu' else
                targets.card_name(target))
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
  if result['platform'] == 'cpu' and config.model.dtype != 'float32':
    print('  note: XLA:CPU computes reduced-precision matmuls and reductions in float32, so '
          'collectives may be counted at 4 bytes where a GPU moves 2.')
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


def _write(result: dict) -> None:
  print(json.dumps(result, indent=1), flush=True)
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__)


if __name__ == '__main__':
  run()
