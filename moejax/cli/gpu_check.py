"""Measurements that need a real accelerator, in one command (run it whenever a GPU is lent).

  python -m moejax.cli.gpu_check --config=configs/tp4pp4.py --out=gpu_check.json

On the first device: its measured bf16 matmul rate; the MFU of one full-size pipeline stage
(the config's blocks per stage with all experts local, forward + backward, the config's dtype
and remat policy); the forward latency of one micro-batch through the whole model on one device;
causal attention of 8,192 tokens with XLA's and cuDNN's kernels (times, agreement); the grouped
matmul the model runs (moejax.kernels.grouped_matmul's choice) on a full-size expert shard
against a dense matmul of the same rows.
Then the tiny config's 4x4 mesh against its 1x1 mesh (float32, matmuls at full precision): on
the accelerators when there are 16, else 1x1 on the accelerator against 4x4 on 16 simulated CPU
devices. Runs anywhere (on CPU it checks itself, with CPU-sized matmuls).
"""
from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from moejax.perf.timing import matmul_rate, timed
from moejax.train.check import equivalence

config_flags.DEFINE_config_file('config', 'configs/tp4pp4.py', 'Config of the stage to time.')
config_flags.DEFINE_config_file('equivalence_config', 'configs/tp4pp4.py:tiny',
                                'Small config whose 4x4 mesh is checked against its 1x1 mesh.')
flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
flags.DEFINE_integer('steps', 10, 'Timed repetitions of each measurement.')


def stage_mfu(config, device, peak: float, steps: int) -> dict:
  """Forward + backward of one pipeline stage (L blocks, all experts local) on one device."""
  import jax
  import jax.numpy as jnp
  from moejax import config as config_lib
  from moejax.model import flops as model_flops
  from moejax.model import transformer
  from moejax.parallel import remat
  from moejax.train.plan import Plan
  full = config_lib.layout(config)
  stage = config.copy_and_resolve_references()
  stage.model.num_blocks = config_lib.layers_per_stage(config_lib.model_config(config), full)
  stage.mesh.update(tp=1, pp=1, dp=1, experts_over_dp=False)
  stage.pipeline.repeats = 1
  plan = Plan(stage, [device])
  cfg, lay = plan.model, plan.layout
  fn = jax.checkpoint(transformer._stage_fn(cfg, lay, train=True),
                      policy=remat.policy(lay.remat_policy))

  def loss(params, x):
    y, _ = fn(params, x, 0, 0, 0, jax.random.key(0), None)
    return jnp.sum(y.astype(jnp.float32))

  params = jax.tree.map(lambda a: a[0, 0], plan.init_params(0)['blocks'])   # [L, ...]
  if lay.unroll_layers:            # one tree per layer, as the pipeline hands unrolled stages
    params = tuple(jax.tree.map(lambda a: a[l], params) for l in range(stage.model.num_blocks))
  x = jax.device_put(jax.random.normal(
      jax.random.key(1), (lay.micro_batch_size, lay.seq_len, cfg.d_model), cfg.dtype), device)
  seconds = timed(plan.jit(jax.grad(loss, argnums=(0, 1))), params, x, steps=steps)
  tokens = lay.micro_batch_size * lay.seq_len
  flops = model_flops.block_flops_per_token(stage) * stage.model.num_blocks * tokens
  return {'stage_blocks': stage.model.num_blocks, 'stage_tokens': tokens,
          'stage_step_s': seconds, 'stage_flops': flops, 'stage_mfu': flops / seconds / peak}


def forward_latency(config, device, steps: int) -> float:
  """Seconds for one micro-batch through the whole model (embedding to loss) on one device."""
  import jax
  from moejax.data.synthetic import SyntheticSource
  from moejax.model import transformer
  from moejax.train.plan import Plan
  one = config.copy_and_resolve_references()
  one.mesh.update(tp=1, pp=1, dp=1, experts_over_dp=False)
  one.pipeline.repeats = 1
  one.data.num_micro_batches = 1
  plan = Plan(one, [device])
  cfg, lay = plan.model, plan.layout
  params = plan.init_params(0)
  tokens = jax.device_put(SyntheticSource('random', cfg.vocab_size, 1, lay.micro_batch_size,
                                          lay.seq_len, 0).batch(0), device)
  forward = plan.jit(lambda p, t: transformer.loss_fn(p, t, jax.random.key(0), cfg=cfg,
                                                      lay=lay, train=False)[0])
  return timed(forward, params, tokens, steps=steps)


def attention_kernels(device, steps: int) -> dict:
  """Causal attention of one 8,192-token sequence (4 heads of 64, bf16; 512 tokens off GPUs),
  forward + backward, with XLA's kernel and with cuDNN's fused one (NVIDIA GPUs only): the
  times and how far cuDNN's output and gradients are from XLA's."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from moejax.kernels import NVIDIA_PLATFORMS
  gpu = device.platform in NVIDIA_PLATFORMS
  t = 8192 if gpu else 512
  q, k, v = (jax.device_put(jax.random.normal(jax.random.key(i), (1, t, 4, 64), jnp.bfloat16),
                            device) for i in range(3))          # [B, T, N, H]

  def program(kernel):
    def loss(q, k, v):
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
      return jnp.sum(o.astype(jnp.float32) ** 2), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  kernels = {'xla': None, 'cudnn': 'cudnn'} if gpu else {'xla': None}
  out = {'attention_tokens': t}
  results = {}
  for name, kernel in kernels.items():
    fn = program(kernel)
    out[f'attention_{name}_s'] = timed(fn, q, k, v, steps=steps)
    results[name] = jax.device_get(fn(q, k, v))
  if 'cudnn' in results:
    (_, o_x), g_x = results['xla']
    (_, o_c), g_c = results['cudnn']
    f32 = lambda a: np.asarray(a, np.float32)
    out['attention_cudnn_speedup'] = out['attention_xla_s'] / out['attention_cudnn_s']
    out['attention_output_max_abs_diff'] = float(np.max(np.abs(f32(o_c) - f32(o_x))))
    out['attention_grad_max_rel_diff'] = max(
        float(np.max(np.abs(f32(a) - f32(b))) / max(np.max(np.abs(f32(b))), 1e-30))
        for a, b in zip(g_c, g_x))
  return out


def grouped_matmul_speed(device, steps: int) -> dict:
  """The grouped matmul the model runs on `device` (moejax.model.grouped_matmul: tokamax's
  where moejax.kernels picks it) on a full-size shard's receive buffer (8,192 rows of d_model
  1,024 over 16 local experts of d_ff 2,048, bf16) against one dense matmul of the same rows,
  and its largest relative difference from jax.lax.ragged_dot. NVIDIA GPUs with tokamax only
  (requirements-cuda12.txt); {} elsewhere."""
  from moejax import kernels
  from moejax.model import grouped_matmul
  kernel, name = kernels.grouped_matmul(device.platform)
  if kernel == 'xla':
    return {}
  import jax
  import jax.numpy as jnp
  import numpy as np
  rows, k, n, groups = 8192, 1024, 2048, 16
  lhs = jax.device_put(jax.random.normal(jax.random.key(0), (rows, k), jnp.bfloat16), device)
  rhs = jax.device_put(jax.random.normal(jax.random.key(1), (groups, k, n), jnp.bfloat16) /
                       k ** 0.5, device)
  sizes = jax.device_put(jnp.full((groups,), rows // groups, jnp.int32), device)
  grouped = jax.jit(grouped_matmul.ragged_dot)
  dense = jax.jit(lambda a, b: a @ b[0])
  out = {'grouped_matmul_kernel': name,
         'grouped_matmul_shape': f'[{rows}, {k}] x [{groups}, {k}, {n}]',
         'grouped_matmul_s': timed(grouped, lhs, rhs, sizes, steps=steps),
         'dense_matmul_same_rows_s': timed(dense, lhs, rhs, steps=steps)}
  out['grouped_over_dense'] = out['grouped_matmul_s'] / out['dense_matmul_same_rows_s']
  ref = np.asarray(jax.lax.ragged_dot(lhs, rhs, sizes), np.float32)
  got = np.asarray(grouped(lhs, rhs, sizes), np.float32)
  out['grouped_matmul_max_rel_diff'] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  return out


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  import jax
  f = flags.FLAGS
  jax.config.update('jax_num_cpu_devices', 16)
  accelerators = jax.devices()
  device = accelerators[0]
  on_cpu = device.platform == 'cpu'
  n = 1024 if on_cpu else 8192
  peak = matmul_rate(device, 'bfloat16', n, f.steps)
  result = {'device': device.device_kind, 'platform': device.platform,
            'matmul_bf16_flops_per_s': peak, 'matmul_size': n}
  print(f'{device.device_kind}: bf16 {n}^3 matmul {peak / 1e12:.1f} TFLOP/s', flush=True)
  result.update(stage_mfu(f.config, device, peak, f.steps))
  print(f"one stage ({result['stage_blocks']} blocks, {result['stage_tokens']} tokens): "
        f"{result['stage_step_s'] * 1e3:.1f} ms fwd+bwd, MFU {result['stage_mfu']:.1%} of the "
        f"measured matmul rate", flush=True)
  result['forward_latency_s'] = forward_latency(f.config, device, f.steps)
  print(f"forward latency of one micro-batch: {result['forward_latency_s'] * 1e3:.1f} ms",
        flush=True)
  result.update(attention_kernels(device, f.steps))
  if 'attention_cudnn_s' in result:
    print(f"causal attention, {result['attention_tokens']} tokens fwd+bwd: XLA "
          f"{result['attention_xla_s'] * 1e3:.2f} ms, cuDNN {result['attention_cudnn_s'] * 1e3:.2f}"
          f" ms ({result['attention_cudnn_speedup']:.2f}x); cuDNN vs XLA: output max abs diff "
          f"{result['attention_output_max_abs_diff']:.1e}, gradients max rel diff "
          f"{result['attention_grad_max_rel_diff']:.1e}", flush=True)
  else:
    print(f"causal attention, {result['attention_tokens']} tokens fwd+bwd: XLA "
          f"{result['attention_xla_s'] * 1e3:.2f} ms (cuDNN needs an NVIDIA GPU)", flush=True)
  result.update(grouped_matmul_speed(device, f.steps))
  if 'grouped_matmul_s' in result:
    print(f"grouped matmul {result['grouped_matmul_shape']} ({result['grouped_matmul_kernel']}): "
          f"{result['grouped_matmul_s'] * 1e3:.2f} ms, a dense matmul of the same rows "
          f"{result['dense_matmul_same_rows_s'] * 1e3:.2f} ms "
          f"({result['grouped_over_dense']:.2f}x); vs jax.lax.ragged_dot max rel diff "
          f"{result['grouped_matmul_max_rel_diff']:.1e}",
          flush=True)
  result.update(equivalence(accelerators, flags.FLAGS.equivalence_config))
  print(f"tiny 4x4 ({result['equivalence_4x4_devices']}) vs 1x1 on "
        f"{result['equivalence_1x1_device']}: loss rel. error "
        f"{result['equivalence_loss_rel_error']:.1e}, gradients "
        f"{result['equivalence_grad_max_rel_error']:.1e}", flush=True)
  print(json.dumps(result, indent=1))
  console.write_json(f.out, result)


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__, flags_parser=console.parse_flags)


if __name__ == '__main__':
  run()
