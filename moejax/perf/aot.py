"""What a compiled train step needs and does, read without running it: per-device memory,
collective bytes against the layout's analytic minimum, and executed matmul FLOPs against the
model's (with the excess named)."""
from __future__ import annotations

import time

from moejax.model import flops as model_flops


def compiled_analysis(config, target: str = 'cpu', plan=None) -> dict:
  """Per-device memory and collective bytes of the train step compiled from abstract inputs,
  for this machine's devices or (target='h100', ...) for abstract GPUs of that card; the
  compiled program is under 'compiled'."""
  from moejax import targets
  from moejax.perf import comm, hlo
  from moejax.train.plan import Plan
  plan = plan or Plan(config)
  if target != 'cpu':
    # Nothing can execute on abstract GPUs (not even optax's init inside eval_shape): the plan
    # is made on the CPU mesh of the same shape, then moved to the GPU mesh.
    plan = plan.on(targets.devices(target, plan.layout.devices))
  start = time.perf_counter()
  compiled = plan.train_step().lower(plan.abstract_state, plan.batch_abstract()).compile()
  compile_s = time.perf_counter() - start
  minimum = comm.minimum_bytes(plan.model, plan.layout, comm.replicated_gradient_bytes(
      plan.abstract_state.params, dict(plan.mesh.shape)))
  text = compiled.as_text()
  collective = hlo.bytes_by_kind(text)
  return {'compile_s': compile_s,
          'memory_per_device_bytes': memory_per_device(compiled, plan.abstract_state),
          **executed_flops(config, text),
          'collective_overlap_frac': hlo.overlap_fraction(text),
          'collective_bytes': collective, 'collective_bytes_min': comm.totals(minimum),
          'collective_bytes_min_terms': minimum,
          'collective_ratio_vs_min': sum(collective.values()) / max(
              sum(comm.totals(minimum).values()), 1),
          # the host of each of the program's partitions (its mesh's devices in order)
          'mesh_hosts': tuple(d.process_index for d in plan.mesh.devices.flat),
          'compiled': compiled}


def memory_per_device(compiled, abstract_state) -> dict[str, int]:
  """The compiled program's per-device buffers, with the state's share of them named."""
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k + '_size_in_bytes', 0)) for k in
            ('argument', 'output', 'alias', 'temp', 'generated_code')} if mem else {}
  memory['params'] = _local_bytes(abstract_state.params)
  memory['optimizer_state'] = _local_bytes(abstract_state.opt_state)
  memory['gradients (in temp)'] = memory['params']
  memory['activations and workspace (rest of temp)'] = memory.get('temp', 0) - memory['params']
  memory['peak'] = (memory.get('argument', 0) + memory.get('output', 0) -
                    memory.get('alias', 0) + memory.get('temp', 0))
  return memory


def _local_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf."""
  import jax
  import numpy as np
  return int(sum(np.prod(l.sharding.shard_shape(l.shape)) * l.dtype.itemsize
                 for l in jax.tree.leaves(tree)))


def executed_flops(config, hlo_text: str) -> dict:
  """Matmul FLOPs the compiled program executes per device per step, against the model's
  (flops_per_token x tokens / devices), and what the excess is made of."""
  from moejax import config as config_lib
  from moejax.parallel import pipeline as pipeline_lib
  from moejax.perf import hlo
  lay = config_lib.layout(config)
  cfg = config_lib.model_config(config)
  # Grouped matmuls count the rows routed to a shard when routing is balanced: 1/ep of the
  # receive buffer (a skewed step does more on its hottest shard).
  share = 1.0 / lay.expert_shards
  parts = hlo.flops(hlo_text, row_share=share)
  model = model_flops.flops_per_token(config) * lay.tokens_per_step / lay.devices
  bubble = pipeline_lib.bubble_fraction(lay.pp, lay.repeats, lay.num_micro_batches)
  excess = parts['total'] - model
  ticks = bubble * (parts['blocks'] + parts['remat'])   # idle ticks run the blocks too
  remat = (1 - bubble) * parts['remat'] + parts['head_remat']
  expert = model_flops.expert_flops(cfg) * cfg.num_blocks * (
      lay.tokens_per_step / lay.devices)                # expert FLOPs the model needs
  grouped = hlo.grouped_matmuls(hlo_text)
  if grouped:   # dropless, or capacity with routing groups split into parts
    # Grouped matmul kernels pad each expert's rows to whole tiles.
    slots = sum(2 * g.k * g.n * (g.rows_computed(share) - share * g.rows) * n
                for g, n in grouped)
    slot_term = 'grouped_matmul_tile_padding'
  elif cfg.dispatch == 'dropless':
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
      'flops_grouped_matmul_rows': 'rows routed at balanced routing (1/ep of the receive '
                                   'buffer) plus tile padding' if grouped else None,
      'flops_excess': {'bubble_ticks': ticks, 'rematerialisation': remat, slot_term: slots,
                       'other': excess - ticks - remat - slots},
  }
