"""The GPU benchmark: one command that fits a short loan of a card.

  python -m moejax.cli.gpu_bench --out=gpu_bench.json --files=DIR     # on an NVIDIA card
  python -m moejax.cli.gpu_bench --tiny                                # the same code on CPU

On the first device: its bf16 matmul rate; for each named shape (moejax.perf.shapes) and each
dispatch (capacity, dropless), a training step as users run it on a 1x1 mesh (forward, backward,
AdamW update): step time, MFU against the card's datasheet bf16 rate and against the measured
rate, the time by op class from a profiler trace of one step, and the time model's prediction
for the same compiled program (moejax.perf.opclass) beside it; then the tiny config's 4x4 mesh
(16 host devices) against its 1x1 mesh under this JAX. Writes one JSON and prints one table;
--files keeps each program's HLO and trace for reading later. Shapes left when --budget_s is
spent are reported as skipped.
"""
from __future__ import annotations

import collections
import os
import tarfile
import tempfile
import time

from absl import flags

flags.DEFINE_bool('tiny', False, 'CPU-sized variants of the shapes (CI; any machine).')
flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
flags.DEFINE_string('files', None, 'Write hlo.tar.gz and traces.tar.gz (per program) here.')
flags.DEFINE_list('shapes', [], 'Named shapes to run (default: all).')
flags.DEFINE_list('dispatch', ['capacity', 'dropless'], 'Dispatch modes to run.')
flags.DEFINE_integer('steps', 5, 'Timed steps per program.')
flags.DEFINE_integer('budget_s', 300, 'Stop starting programs after this many seconds (the '
                     'kernel comparison and the equivalence follow: about 2 minutes on an H200).')
flags.DEFINE_bool('kernels', True, 'Also time each grouped-matmul implementation on the '
                  'shapes\' expert matrices (NVIDIA cards).')
flags.DEFINE_bool('equivalence', True, 'Also the tiny 4x4-vs-1x1 check on 16 host devices.')
flags.DEFINE_enum('predict', None, ['h100', 'h200', 'a100'], 'Measure nothing: compile each '
                  'shape here for this card (jax[cuda12], no GPU) and print the calibrated time '
                  'model\'s step, MFU and op classes.')

FLAGS = flags.FLAGS


def _card(device) -> str:
  """The target file (moejax/targets) whose rates describe `device` ('cpu' off NVIDIA)."""
  kind = device.device_kind.lower()
  for name in ('h200', 'h100', 'a100'):
    if name in kind:
      return name
  return 'h100' if device.platform != 'cpu' else 'cpu'


def measure_program(config, steps: int, trace_dir: str | None, hlos: dict, key: str) -> dict:
  """One shape: its train step's time, MFU, op-class times from a trace, and the prediction;
  its compiled program's text goes into hlos[key] as soon as it is compiled."""
  import jax
  from moejax import targets
  from moejax.model import flops as model_flops
  from moejax.perf import calibration, opclass, profile, speed
  runner = speed.StepRunner(config)
  text = hlos[key] = runner.step_fn.as_text()
  seconds = runner.time(steps)
  out = {'step_s': seconds, 'tokens': runner.lay.tokens_per_step,
         'compile_s': runner.analysis['compile_s'],
         'peak_bytes': runner.analysis['memory_per_device_bytes'].get('peak', 0),
         'flops_executed_over_model': runner.analysis['flops_executed_over_model'],
         'model_flops_per_token': model_flops.flops_per_token(config)}
  out['model_flops_per_s'] = out['model_flops_per_token'] * out['tokens'] / seconds
  card = _card(jax.devices()[0])
  if card != 'cpu':
    rates = targets.rates(card)
    raw = opclass.predict(text, rates)
    out.update(opclass.predict(text, rates, calibration.ratios(card)))
    out['uncalibrated_step_s'] = raw['predicted_step_s']
    out['uncalibrated_s_by_class'] = raw['predicted_s_by_class']
    out['predicted_mfu'] = (out['model_flops_per_token'] * out['tokens'] /
                            out['predicted_step_s'] / rates.bf16_flops_per_s)
  else:
    out['kernel_classes'] = dict(sorted(collections.Counter(opclass.classes(text).values()).items()))
  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):   # one step
      runner.state, _ = runner.step_fn(runner.state, runner.batch)
      jax.block_until_ready(runner.state)
    path = profile.trace_file(trace_dir)
    if path:
      events = profile.device_events(path)
      per_op = profile.kernel_seconds(events)
      out['measured_s_by_class'] = opclass.measured_by_class(events, text)
      out['measured_busy_s'] = profile.busy_seconds(events)
      out['top_kernels'] = sorted(({'op': k, **v} for k, v in per_op.items()),
                                  key=lambda r: -r['s'])[:25]
  return out


def main(argv):
  del argv
  from moejax.cli import console
  console.quiet_logs()
  if FLAGS.predict:
    return _predict(FLAGS.predict)
  import jax
  jax.config.update('jax_num_cpu_devices', 16)
  from moejax.perf.timing import matmul_rate
  from moejax.perf import shapes
  start = time.perf_counter()
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  n = 1024 if on_cpu else 8192
  measured = matmul_rate(device, 'bfloat16', n, FLAGS.steps)
  card = _card(device)
  spec = measured if card == 'cpu' else _spec_rate(card)
  result = {'device': device.device_kind, 'platform': device.platform, 'jax': jax.__version__,
            'card_rates': card, 'matmul_bf16_measured_flops_per_s': measured,
            'matmul_bf16_spec_flops_per_s': spec, 'programs': {}}
  print(f'{device.device_kind} (jax {jax.__version__}): bf16 {n}^3 matmul '
        f'{measured / 1e12:.1f} TFLOP/s measured, {spec / 1e12:.0f} datasheet', flush=True)
  work = tempfile.mkdtemp(prefix='gpu_bench_')
  hlos = {}
  for name in FLAGS.shapes or list(shapes.SHAPES):
    for dispatch in FLAGS.dispatch:
      key = f'{name}/{dispatch}'
      if time.perf_counter() - start > FLAGS.budget_s:
        result['programs'][key] = {'skipped': f'--budget_s={FLAGS.budget_s} spent'}
        continue
      try:
        config = shapes.config(name, dispatch, tiny=FLAGS.tiny)
        trace = os.path.join(work, 'traces', key.replace('/', '_'))
        r = measure_program(config, FLAGS.steps, trace, hlos, key)
        r['mfu'] = r['model_flops_per_s'] / spec
        r['mfu_vs_measured_matmul'] = r['model_flops_per_s'] / measured
      except Exception as e:   # one shape's failure must not cost the others' figures
        r = {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
      result['programs'][key] = r
      print(_line(key, r), flush=True)
      console.write_json(FLAGS.out, result)   # so far: a later abort keeps these figures
      jax.clear_caches()
  if FLAGS.kernels and not on_cpu:
    result['grouped_matmul'] = _grouped_kernels(device, FLAGS.steps)
  _keep_files(work, hlos)
  console.write_json(FLAGS.out, result)
  if FLAGS.equivalence:
    result['equivalence'] = _equivalence()
    print(f"tiny 4x4 vs 1x1: {result['equivalence']}", flush=True)
  result['wall_s'] = time.perf_counter() - start
  _table(result)
  console.write_json(FLAGS.out, result)


def _predict(card: str) -> None:
  """Each shape's program compiled here for `card`: the calibrated time model's step, MFU and
  op classes (moejax.perf.estimate), the figures part 5's targets apply to without a card."""
  import sys
  from moejax import targets
  from moejax.cli import console
  from moejax.errors import MoejaxError
  try:
    targets.prepare(card)
  except MoejaxError as e:
    sys.exit(f'error: {e}')
  from moejax import kernels
  from moejax.perf import aot, estimate, shapes
  start = time.perf_counter()
  result = {'predicted_for': targets.card_name(card), 'programs': {}}
  matmul, why = kernels.grouped_matmul('cuda')
  for name in FLAGS.shapes or list(shapes.SHAPES):
    for dispatch in FLAGS.dispatch:
      key = f'{name}/{dispatch}'
      if dispatch == 'dropless' and matmul != 'mosaic':   # not what the card would run
        result['programs'][key] = {'skipped': f'the grouped matmul here is {why}'}
        print(f"{key:28s} skipped: {result['programs'][key]['skipped']}", flush=True)
        continue
      config = shapes.config(name, dispatch, tiny=FLAGS.tiny)
      analysis = aot.compiled_analysis(config, card)
      text = analysis.pop('compiled').as_text()
      model = estimate.time_model(text, analysis['mesh_hosts'], card,
                                  analysis['flops_model_per_device'])
      peak = analysis['memory_per_device_bytes']['peak']
      r = result['programs'][key] = dict(
          model, peak_bytes=peak, fits=peak <= targets.rates(card).memory_bytes,
          compile_s=analysis['compile_s'],
          flops_executed_over_model=analysis['flops_executed_over_model'])
      print(f"{key:28s} predicted {r['predicted_step_s'] * 1e3:8.2f} ms, MFU "
            f"{r['predicted_mfu']:6.1%}, {r['kernel_launches']:,} kernels, peak "
            f"{peak / 2**30:.1f} GiB{'' if r['fits'] else ' (DOES NOT FIT)'}", flush=True)
      console.write_json(FLAGS.out, result)
  result['wall_s'] = time.perf_counter() - start
  _table(result)
  console.write_json(FLAGS.out, result)


def _grouped_kernels(device, steps: int) -> dict:
  """Forward + both gradients of one expert matrix's grouped matmul (8,192 rows x top_k spread
  evenly over the shape's experts) with each implementation: TFLOP/s, or the error."""
  import functools
  import jax
  import jax.numpy as jnp
  from moejax.perf import shapes
  from moejax.perf.timing import timed
  impls = {'xla_ragged_dot': lambda a, b, g: jax.lax.ragged_dot(a, b, g)}
  try:
    import tokamax
    for name in ('triton', 'mosaic_gpu'):
      impls[f'tokamax_{name}'] = functools.partial(tokamax.ragged_dot, implementation=name)
  except Exception as e:
    impls = dict(impls, tokamax=f'{type(e).__name__}: {e}')
  out = {}
  for shape_name in ('olmoe_1b_7b', 'qwen3_30b_a3b', 'mixtral_8x7b', 'seed_stage'):
    c = shapes.config(shape_name, 'dropless')
    e, d, f, k = c.moe.num_experts, c.model.d_model, c.moe.d_ff, c.moe.top_k
    rows = 8192 * k
    lhs = jax.device_put(jax.random.normal(jax.random.key(0), (rows, d), jnp.bfloat16), device)
    rhs = jax.device_put(jax.random.normal(jax.random.key(1), (e, d, f), jnp.bfloat16) / d ** .5,
                         device)
    sizes = jax.device_put(jnp.full((e,), rows // e, jnp.int32), device)
    for name, fn in impls.items():
      key = f'{shape_name} [{rows},{d}]x[{e},{d},{f}] {name}'
      if isinstance(fn, str):
        out[key] = fn
        continue
      try:
        loss = lambda a, b, g, fn=fn: jnp.sum(fn(a, b, g).astype(jnp.float32))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        seconds = timed(step, lhs, rhs, sizes, steps=steps)
        out[key] = {'s': seconds, 'tflops': 3 * 2 * rows * d * f / seconds / 1e12}
      except Exception as e_:
        out[key] = f'{type(e_).__name__}: {str(e_)[:300]}'
      print(f'  grouped matmul {key}: {out[key]}', flush=True)
  return out


def _spec_rate(card: str) -> float:
  from moejax import targets
  return targets.rates(card).bf16_flops_per_s


def _equivalence() -> dict:
  import jax
  from moejax.perf import shapes
  from moejax.train.check import equivalence
  try:
    return equivalence(jax.devices(), shapes.load('configs/tp4pp4.py', 'tiny'))
  except Exception as e:
    return {'error': f'{type(e).__name__}: {str(e)[:2000]}'}


def _line(key: str, r: dict) -> str:
  if 'error' in r or 'skipped' in r:
    return f"{key:28s} {r.get('error') or r.get('skipped')}"
  pred = (f" | predicted {r['predicted_step_s'] * 1e3:8.2f} ms, MFU {r['predicted_mfu']:.1%}"
          if 'predicted_step_s' in r else '')
  return (f"{key:28s} step {r['step_s'] * 1e3:9.2f} ms, MFU {r['mfu']:6.1%} "
          f"({r['tokens']} tokens, {r['flops_executed_over_model']:.2f}x model FLOPs){pred}")


def _table(result: dict) -> None:
  from moejax.perf import opclass
  print(f"\n{'program':28s} {'class':12s} {'measured ms':>12s} {'predicted ms':>13s}")
  for key, r in result['programs'].items():
    measured = r.get('measured_s_by_class', {})
    predicted = r.get('predicted_s_by_class', {})
    for c in opclass.CLASSES:
      if c in measured or c in predicted:
        m = f"{measured[c] * 1e3:12.2f}" if c in measured else f"{'-':>12s}"
        p = f"{predicted[c] * 1e3:13.2f}" if c in predicted else f"{'-':>13s}"
        print(f'{key:28s} {c:12s} {m} {p}')
  print(f"wall {result['wall_s']:.0f} s", flush=True)


def _keep_files(work: str, hlos: dict[str, str]) -> None:
  if not FLAGS.files:
    return
  os.makedirs(FLAGS.files, exist_ok=True)
  with tarfile.open(os.path.join(FLAGS.files, 'hlo.tar.gz'), 'w:gz') as tar:
    for key, text in hlos.items():
      path = os.path.join(work, key.replace('/', '_') + '.hlo')
      with open(path, 'w') as f:
        f.write(text)
      tar.add(path, arcname=os.path.basename(path))
  traces = os.path.join(work, 'traces')
  if os.path.isdir(traces):
    with tarfile.open(os.path.join(FLAGS.files, 'traces.tar.gz'), 'w:gz') as tar:
      for root, _, files in os.walk(traces):
        for f in files:
          if f.endswith('perfetto_trace.json.gz'):
            tar.add(os.path.join(root, f), arcname=os.path.relpath(os.path.join(root, f), traces))


def run() -> None:
  """Console-script entry point."""
  from moejax.cli import console
  console.run(main, __name__, flags_parser=console.parse_flags)


if __name__ == '__main__':
  run()
