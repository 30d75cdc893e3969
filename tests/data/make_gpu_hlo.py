"""Regenerates the H100 programs tests/test_hlo.py reads (compiled for abstract H100s, no GPU).

  pip install -r requirements.txt -r requirements-cuda12.txt
  python tests/data/make_gpu_hlo.py [NAME.hlo ...]

h100_collectives.hlo, 8 H100s: per device x_ [64, 128] f32; a 5-step scan of (x_ @ w) with a
psum over pp inside; then all_to_all, all_gather, psum_scatter (tp), ppermute (pp) and a
ragged_all_to_all (tp) of the [64, 128] rows into a [256, 128] buffer. tests/test_hlo.py checks
the collective bytes and the matmul FLOPs read from it against numbers worked out by hand.

h100_dropless_moe.hlo, 4 H100s (tp=4): the gradient of one dropless MoE layer
(moejax.model.moe, 8 experts, x [2, 64, 32] f32).

h100_pipeline.hlo, 2 H100s (pp=2): the gradient of moejax.parallel.pipeline (2 circular
repeats, 4 micro-batches x [2, 128, 384] bf16, each stage 2 unrolled layers of tanh(x @ w), the
f32 w [384, 384] cast to bf16 once per step: precision.Cast, precision.einsum).

h100_dp_pipeline.hlo, 4 H100s (dp=2 x pp=2): the same pipeline with 4 micro-batches x
[4, 128, 384] bf16, the batch split over dp, and layers of tanh((x * g) @ w), the f32 g [384]
cast at every tick; both weights replicated over dp.

h100_cudnn_attention.hlo, 4 H100s (tp=4, heads split): the gradient of causal attention
(moejax.model.layers._attend with the kernel moejax.kernels.attention picks for a bfloat16 model on
NVIDIA GPUs) of q, k, v [2, 512, 8, 64] bf16.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from moejax import targets  # noqa: E402

targets.prepare('h100')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def program(x, w):
  def local(x_, w_):                                        # x_ [64, 128], w_ [128, 128]
    def body(c, _):
      return jnp.tanh(jax.lax.psum(c @ w_, 'pp')), None     # all-reduce [64, 128] per step
    c, _ = jax.lax.scan(body, x_, None, length=5)
    a = jax.lax.all_to_all(c, 'tp', 0, 0, tiled=True)      # [64, 128]
    g = jax.lax.all_gather(a, 'tp', tiled=True)            # [256, 128]
    r = jax.lax.psum_scatter(g * 2.0, 'tp', scatter_dimension=0, tiled=True)  # [64, 128]
    p = jax.lax.ppermute(r, 'pp', [(0, 1), (1, 0)])        # [64, 128]
    sizes = jnp.full((4,), 16, jnp.int32)
    offsets = jnp.arange(4, dtype=jnp.int32) * 16
    me = jax.lax.axis_index('tp') * 16
    return jax.lax.ragged_all_to_all(p, jnp.zeros((256, 128)), offsets, sizes,
                                     jnp.full((4,), me, jnp.int32), sizes, axis_name='tp')
  return jax.shard_map(local, in_specs=(P('tp'), P()), out_specs=P('tp'), check_vma=False)(x, w)


def write(name: str, text: str) -> None:
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  with open(out, 'w') as f:
    f.write(text)
  print(f'wrote {out} ({len(text)} chars)')


def collectives_program() -> str:
  mesh = Mesh(np.array(targets.devices('h100', 8)).reshape(4, 2), ('tp', 'pp'))
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P('tp')))
  w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    return jax.jit(program).lower(x, w).compile().as_text()


def dropless_moe_program() -> str:
  from moejax import config as config_lib
  from moejax.model import moe as moe_lib
  from moejax.parallel import mesh as mesh_lib
  from moejax.train import plan as plan_lib
  mesh = mesh_lib.make_mesh(config_lib.MeshShape.of(4), targets.devices('h100', 4))
  e, d, f = 8, 32, 64
  shapes = moe_lib.ExpertWeights(router=(d, e), w1=(e, d, f), b1=(e, f), w2=(e, f, d), b2=(e, d))
  with plan_lib.bare(mesh):
    sharded = lambda shape, axes: jax.ShapeDtypeStruct(shape, jnp.float32,
                                                      sharding=mesh_lib.sharding(mesh, axes))
    weights = moe_lib.ExpertWeights(*(sharded(s, a) for s, a in
                                      zip(shapes[:5], moe_lib.WEIGHT_AXES[:5])))
    x = sharded((2, 64, d), ('act_batch', 'act_seq', 'act_embed'))
    settings = moe_lib.MoESettings(group_size=16, top_k=2, dispatch='dropless')
    loss = lambda w, x: jnp.sum(moe_lib.moe(w, x, jax.random.key(0), settings)[0] ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(weights, x).compile().as_text()


def cudnn_attention_program() -> str:
  from moejax import config as config_lib
  from moejax import kernels
  from moejax.model import layers
  from moejax.parallel import mesh as mesh_lib
  from moejax.train import plan as plan_lib
  from configs import tp4pp4
  c = tp4pp4.get_config('tiny')
  c.model.update(dtype='bfloat16', num_heads=8, head_dim=64, d_model=512)
  kernel, _ = kernels.attention(config_lib.model_config(c), 'cuda', packed=False)
  assert kernel == 'cudnn', kernel
  mesh = mesh_lib.make_mesh(config_lib.MeshShape.of(4), targets.devices('h100', 4))
  with plan_lib.bare(mesh):
    qkv = jax.ShapeDtypeStruct((2, 512, 8, 64), jnp.bfloat16, sharding=mesh_lib.sharding(
        mesh, ('act_batch', None, 'act_heads', None)))
    loss = lambda q, k, v: jnp.sum(layers._attend(q, k, v, None, True, kernel).astype(
        jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv).compile().as_text()


def _pipeline_gradient(dp: int) -> str:
  """h100_pipeline.hlo (dp=1: w only) or h100_dp_pipeline.hlo (dp=2: w and g, the batch split
  over dp): the gradient of the pipeline, 2 stages x 2 repeats x 2 unrolled layers."""
  from moejax import config as config_lib, precision
  from moejax.parallel import mesh as mesh_lib, pipeline as pipeline_lib
  from moejax.train import plan as plan_lib
  mesh = mesh_lib.make_mesh(config_lib.MeshShape.of(1, pp=2, dp=dp),
                            targets.devices('h100', 2 * dp))

  def stage_fn(layers, x, *_):        # L per-layer {'w': Cast [D, D], ('g': [D])}, x [B, T, D]
    for p in layers:
      if 'g' in p:
        x = x * p['g'].astype(x.dtype)
      x = jnp.tanh(precision.einsum('BTD,DF->BTF', x, p['w']))
    return x, {'n': jnp.zeros((len(layers),))}

  with plan_lib.bare(mesh):
    stage = mesh_lib.sharding(mesh, ('stage',))
    params = {'w': jax.ShapeDtypeStruct((2, 2, 2, 384, 384), jnp.float32,    # [S, R, L, D, D]
                                        sharding=stage)}
    cast_once = {'w': 'bfloat16'}
    if dp > 1:
      params['g'] = jax.ShapeDtypeStruct((2, 2, 2, 384), jnp.float32, sharding=stage)
      cast_once['g'] = ''                                            # cast at every tick
    xs = jax.ShapeDtypeStruct((4, 2 * dp, 128, 384), jnp.bfloat16,          # [M, B, T, D]
                              sharding=mesh_lib.sharding(mesh, ('act_micro', 'act_batch')))
    loss = lambda p, xs: jnp.sum(pipeline_lib.pipeline(
        stage_fn, p, xs, jax.random.key(0), stages=2, repeats=2,
        remat_policy='nothing_saveable', cast_once=cast_once,
        split_layers=True)[0].astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()


PROGRAMS = {'h100_collectives.hlo': collectives_program,
            'h100_pipeline.hlo': lambda: _pipeline_gradient(1),
            'h100_dp_pipeline.hlo': lambda: _pipeline_gradient(2),
            'h100_dropless_moe.hlo': dropless_moe_program,
            'h100_cudnn_attention.hlo': cudnn_attention_program}


def main():
  for name in sys.argv[1:] or PROGRAMS:     # default: every program
    write(name, PROGRAMS[name]())


if __name__ == '__main__':
  main()
