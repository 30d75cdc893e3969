"""The seed's model and layout: tensor parallel 4 x pipeline parallel 4, 64 experts, top-1.

  python main.py --config=configs/tp4pp4.py --workdir=/tmp/tp4pp4        # full size, 16 accelerators
  python main.py --config=configs/tp4pp4.py:tiny --workdir=/tmp/tiny      # same topology, CPU-sized

Any key can be overridden, e.g. --config.mesh.tp=2 --config.mesh.pp=8.
"""
import ml_collections

from moejax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'full'
  if variant not in ('full', 'tiny'):
    raise ValueError(f'Unknown variant {arg!r} of configs/tp4pp4.py; use "tiny" or nothing.')
  tiny = variant == 'tiny'
  c = ml_collections.ConfigDict()

  c.mesh = ml_collections.ConfigDict(dict(
      dp=1,  # data parallel: each micro-batch's sequences split over dp (outermost axis)
      tp=4,  # tensor + expert parallel axis (devices that talk most)
      pp=4,  # pipeline stages
      experts_over_dp=False,  # split experts over dp x tp ("parallel folding"); needs dp > 1
      shard_optimizer=False,  # ZeRO-1: Adam moments also split over dp
  ))
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256 if tiny else 50257,  # real vocabulary (padded to a multiple of 128 inside)
      d_model=64 if tiny else 1024,
      num_heads=4 if tiny else 16,
      head_dim=16 if tiny else 64,
      num_blocks=8,                       # blocks of attention + MoE
      max_len=64 if tiny else 1024,       # learned position table
      dtype='float32' if tiny else 'bfloat16',  # compute dtype; params are float32
      init_std=0.02,                      # normal init std (output projections scaled by depth)
      attn_bias=True,                     # q/k/v and output-projection biases (the seed's Megatron layers)
      positions='learned',                # 'learned' table (GPT-2, the seed's) or 'rope' (rotary: any length)
      rope_base=10_000.0,                 # rotary base (positions='rope'; Mixtral and Qwen3 use 1e6)
      norm='layernorm',                   # 'layernorm' (GPT-2, the seed's) or 'rmsnorm' (OLMoE, Qwen3, Mixtral)
      norm_eps=1e-5,                      # epsilon of every norm
      num_kv_heads=0,                     # grouped-query attention: key/value heads (0: num_heads)
      qk_norm='none',                     # RMSNorm of q and k: 'none', 'full' (whole width, OLMoE) or 'head' (Qwen3)
      attention='auto',                   # 'auto' (cuDNN fused attention on NVIDIA GPUs where it applies), 'xla' or 'cudnn'
  ))
  c.moe = ml_collections.ConfigDict(dict(
      num_experts=16 if tiny else 64,
      top_k=1,
      d_ff=128 if tiny else 2048,          # expert hidden width
      capacity_factor=1.1,                # slots = ceil(cf * group_size * top_k / num_experts)
      eval_capacity_factor=2.0,
      group_size=16 if tiny else 256,     # tokens per routing group: a chunk of a sequence, or k whole sequences
      dropout=0.0 if tiny else 0.1,       # dropout on expert hidden activations
      aux_loss_weight=0.01,               # Switch load-balancing loss weight (per layer)
      z_loss_weight=0.0,                  # router z-loss weight (ST-MoE); 0 disables
      gelu='exact',                       # expert GELU: 'exact' (erf, the seed's nn.GELU()) or 'tanh'
      normalize_gates=False,              # top-k>1: renormalise a token's kept gates to sum to 1
      bias_update_rate=0.0,               # >0: aux-loss-free balancing (a selection bias on the logits)
      bias_update_rule='sign',            # 'sign' (DeepSeek-V3: +-rate) or 'relative' (rate x load error)
      sinkhorn_iters=0,                   # >0: balance each routing group's choices in training (Sinkhorn)
      dispatch='capacity',                # 'capacity' (the seed's: drop past capacity) or 'dropless'
      ffn='gelu',                         # expert FFN: 'gelu' MLP (the seed's) or 'swiglu' (gate w1, up w3, down w2)
      expert_bias=True,                   # biases in the expert FFNs (the seed's Megatron layers)
      normalize_gates_over='kept',        # normalize_gates over the 'kept' gates (after capacity) or 'top_k' (before; HF)
  ))
  c.pipeline = ml_collections.ConfigDict(dict(
      repeats=1,                          # circular repeats: each device holds r block groups
      # What each stage keeps for its backward pass (moejax.config.REMAT_POLICIES).
      # 'save_dots_and_collectives' keeps every matmul output and the outputs of the stage's
      # all-gathers, reduce-scatters and all-to-alls: the backward pass recomputes only
      # elementwise work (fewest FLOPs of all policies at 11.5 GiB per H100; BENCHMARKS.md).
      remat_policy='nothing_saveable' if tiny else 'save_dots_and_collectives',
      unroll_layers=not tiny,             # a stage's layers unrolled (GPUs: no per-micro-batch weight-gradient copies); a scan compiles faster
  ))
  c.data = ml_collections.ConfigDict(dict(
      source='learnable' if tiny else 'random',  # 'random' (the seed), 'learnable' or 'tokens'
      path='',                            # token dataset dir for source='tokens' (moejax.cli.prepare)
      seq_len=64 if tiny else 1024,
      micro_batch_size=2 if tiny else 8,  # sequences per micro-batch
      num_micro_batches=16,               # micro-batches per step (gradient accumulation)
      pack=False,                         # source='tokens': rows of whole documents, masked apart
      buckets='',                         # e.g. '32,64,128': row lengths per step, tokens per step fixed
  ))
  c.optim = config_files.adamw(3e-3 if tiny else 1e-4, warmup_steps=20 if tiny else 2000,
                           decay_steps=1000 if tiny else 100_000)
  config_files.run_keys(c, num_steps=300 if tiny else 100_000, log_every=10 if tiny else 50,
                    checkpoint_every=100 if tiny else 1000)
  return c
