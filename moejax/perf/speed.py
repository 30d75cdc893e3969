"""Measured speed on this machine's devices: a train step on the configured mesh against the
same model and global batch on a 1x1 mesh (interleaved rounds), forward latency, MFU, and greedy
generation with and without the KV cache. Every time is taken by perf/timing."""
from __future__ import annotations

from moejax.model import flops as model_flops
from moejax.perf import aot
from moejax.perf.timing import matmul_flops_per_s, timed, timed_carry


class StepRunner:
  """A compiled train step (and forward pass) of one config, with its own state and batch."""

  def __init__(self, config):
    from moejax.data.source import global_batch
    from moejax.train import loop
    from moejax.train.plan import Plan
    plan = Plan(config)
    self.plan, self.lay = plan, plan.layout
    self.analysis = aot.compiled_analysis(config, plan=plan)
    self.step_fn = self.analysis.pop('compiled')
    self.state = plan.create_state()
    self.batch = global_batch(loop.make_source(plan), 0, plan.batch_sharding)
    self.forward_fn = plan.eval_step()
    self.metrics = None

  def time_forward(self, steps: int) -> float:
    """Seconds per forward pass (no backward) of the whole batch through the whole model."""
    return timed(self.forward_fn, self.state.params, self.batch, steps=steps)

  def time(self, steps: int) -> float:
    """Seconds per train step, the state carried from step to step."""
    seconds, self.state, (self.metrics,) = timed_carry(self.step_fn, self.state, self.batch,
                                                       steps=steps)
    return seconds


def measure(config, steps: int, rounds: int) -> dict:
  """Step time against 1x1, bubble, forward latency, MFU and the compiled analysis of `config`."""
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
  main, ref, lat = StepRunner(config), StepRunner(ref_config), StepRunner(lat_config)
  times, ref_times = [], []
  for _ in range(rounds):
    times.append(main.time(steps))
    ref_times.append(ref.time(steps))
  step_time, ref_time = float(np.median(times)), float(np.median(ref_times))
  lay, m = main.lay, jax.device_get(main.metrics)
  kept = np.asarray(m['expert_load'])
  peak = matmul_flops_per_s(jax.devices()[:lay.devices])
  fpt = model_flops.flops_per_token(config)
  tps = lay.tokens_per_step / step_time
  formula = pipeline_lib.bubble_fraction(lay.pp, lay.repeats, lay.num_micro_batches)
  platform = jax.devices()[0].platform
  return {
      'mesh': f'{lay.tp}x{lay.pp}' + (f' dp={lay.dp}' if lay.dp > 1 else ''),
      'repeats': lay.repeats, 'micro_batches': lay.num_micro_batches,
      'devices': lay.devices, 'platform': platform,
      'step_time_s': step_time, 'step_time_1x1_s': ref_time,
      'forward_latency_s': lat.time_forward(steps), 'forward_step_s': main.time_forward(steps),
      'ratio_vs_1x1': step_time / ref_time,
      'tokens_per_sec': tps, 'flops_per_token': fpt,
      'mfu': fpt * tps / peak, 'peak_flops': peak,
      'peak_flops_source': f'float32 512x512 matmul measured now on the same {lay.devices} '
                           f'{platform} devices',
      **main.analysis,
      'dropped_frac': float(m['dropped_frac']),
      'tokens_per_expert': {'min': float(kept.min()), 'mean': float(kept.mean()),
                            'max': float(kept.max())},
      'balance': metrics_lib.expert_balance(m['expert_assigned']),
      # The same work with pp=1 takes ref_time; idle ticks add (ratio - 1) / ratio of the time.
      'bubble_measured': 1.0 - ref_time / step_time, 'bubble_formula': formula,
      'idle_tick_factor': 1.0 / (1.0 - formula),
  }


def stop_vote_cost(config, steps: int, rounds: int) -> dict:
  """Train-step time with and without the multi-process stop vote cast at every boundary (as
  the loop does), interleaved rounds on one process: the vote's device max and its one-boundary-
  late read, without the cross-host hop."""
  import numpy as np
  from moejax.train.stop_vote import StopVote
  runner = StepRunner(config)
  vote = StopVote(runner.plan.mesh)
  voting = lambda state, batch: (*runner.step_fn(state, batch), vote.cast(False))
  plain, voted = [], []
  for _ in range(rounds):
    plain.append(runner.time(steps))
    seconds, runner.state, _ = timed_carry(voting, runner.state, runner.batch, steps=steps)
    voted.append(seconds)
  step_s, voted_s = float(np.median(plain)), float(np.median(voted))
  return {'mesh': f'{runner.lay.tp}x{runner.lay.pp}', 'steps': steps, 'rounds': rounds,
          'step_time_s': step_s, 'step_time_with_vote_s': voted_s,
          'vote_cost_s': voted_s - step_s, 'vote_cost_frac': voted_s / step_s - 1.0}


def decode_speed(config, prompt_len: int, new_tokens: int) -> dict:
  """Greedy generation of `new_tokens` after a `prompt_len` prompt, one sequence, on the config's
  tp (pp=1: one stage-group): with the KV cache and with the windowed re-run of data.seq_len."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax import generate as gen
  from moejax.model import decode, params as params_lib
  from moejax.train.plan import Plan
  c = config.copy_and_resolve_references()
  c.mesh.update(pp=1, dp=1, experts_over_dp=False)
  c.pipeline.repeats = 1
  c.data.update(num_micro_batches=1, micro_batch_size=1, source='random')
  plan = Plan(c, jax.devices()[:c.mesh.tp])
  params, greedy = plan.init_params(), gen.Sampling()
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, plan.model.vocab_size, (1, prompt_len)),
                       jnp.int32)   # [1, prompt_len]
  key = jax.random.key(0)
  cached_s = timed(gen.cached_program(plan, prompt_len, new_tokens, greedy), params, prompt, key)
  window = np.zeros((1, 1, plan.layout.seq_len), np.int32)   # [micro_batches, batch, seq]
  window[0, 0, :prompt_len] = np.asarray(prompt)[0]
  window = jax.device_put(window, plan.batch_sharding)
  windowed_s = timed(gen.windowed_program(plan, prompt_len, new_tokens, greedy),
                     params, window, key)
  cfg, length = plan.model, prompt_len + new_tokens
  step = plan.jit(lambda p, cache, tok, at: decode.extend(p, cache, tok, at, cfg=cfg))
  canonical = plan.jit(params_lib.tree_from_stages)(params)
  cache = plan.jit(lambda: decode.empty_cache(cfg, 1, length))()
  _, cache = step(canonical, cache, prompt, jnp.int32(0))                # prefill
  step_s = timed(step, canonical, cache, prompt[:, -1:], jnp.int32(prompt_len), steps=20)
  prefill_s = timed(step, canonical, cache, prompt, jnp.int32(0), steps=3)
  return {'mesh': f'tp={c.mesh.tp} pp=1', 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'window': plan.layout.seq_len,
          'decode_tokens_per_sec': new_tokens / cached_s,
          'decode_tokens_per_sec_no_cache': new_tokens / windowed_s,
          'cache_speedup': windowed_s / cached_s,
          'decode_step_latency_s': step_s, 'prefill_latency_s': prefill_s,
          'generation_s': cached_s, 'generation_no_cache_s': windowed_s}
