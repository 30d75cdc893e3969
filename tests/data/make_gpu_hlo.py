"""Regenerates tests/data/h100_collectives.hlo: a small program compiled for 8 abstract H100s.

  pip install -r requirements.txt -r requirements-cuda12.txt
  python tests/data/make_gpu_hlo.py

Per device: x_ [64, 128] f32; a 5-step scan of (x_ @ w) with a psum over pp inside; then
all_to_all, all_gather, psum_scatter (tp) and ppermute (pp). tests/test_hlo.py checks the
collective bytes and the matmul FLOPs read from it against numbers worked out by hand.
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
    return jax.lax.ppermute(r, 'pp', [(0, 1), (1, 0)])     # [64, 128]
  return jax.shard_map(local, in_specs=(P('tp'), P()), out_specs=P('tp'), check_vma=False)(x, w)


def main():
  mesh = Mesh(np.array(targets.devices('h100', 8)).reshape(4, 2), ('tp', 'pp'))
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P('tp')))
  w = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    text = jax.jit(program).lower(x, w).compile().as_text()
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'h100_collectives.hlo')
  with open(out, 'w') as f:
    f.write(text)
  print(f'wrote {out} ({len(text)} chars)')


if __name__ == '__main__':
  main()
