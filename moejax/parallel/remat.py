"""What the backward pass recomputes: the remat policies by name, and the names of the
activations a collective produced (jax.ad_checkpoint.checkpoint_name), which some keep."""
from __future__ import annotations

from collections.abc import Callable

import jax

ATTN_GATHERED = 'attn_gathered'    # the sequence all-gathered before q/k/v
ATTN_REDUCED = 'attn_reduced'      # the output projection reduce-scattered over the sequence
MOE_DISPATCHED = 'moe_dispatched'  # rows after the dispatch all_to_all
MOE_RETURNED = 'moe_returned'      # rows after the return all_to_all
COLLECTIVE_OUTPUTS = (ATTN_GATHERED, ATTN_REDUCED, MOE_DISPATCHED, MOE_RETURNED)
# A matmul output that is no dot_general, so dots_saveable cannot see it: a ragged_dot, or an
# einsum under a custom VJP (moejax.precision.einsum).
CUSTOM_MATMUL = 'custom_matmul'
# cuDNN's fused attention forward (output and softmax statistics): a custom call, not a
# dot_general, so dots_saveable alone would recompute it in the backward pass.
FUSED_ATTENTION_PRIMITIVES = ('dot_product_attention_fwd_wrapper',)


def _fused_attention(prim, *_, **__) -> bool:
  return prim.name in FUSED_ATTENTION_PRIMITIVES


# The policies that keep matmul outputs for the backward pass (the rest recompute them).
KEEP_MATMUL_OUTPUTS = ('save_dots_and_collectives', 'dots_saveable',
                       'dots_with_no_batch_dims_saveable', 'everything_saveable')


def keeps_matmul_outputs(name: str) -> bool:
  """Whether policy `name` keeps matmul outputs: also what the LM head keeps outside the
  pipeline's checkpoint (its logits' gradient, or nothing and a recomputed matmul)."""
  return name in KEEP_MATMUL_OUTPUTS


def policy(name: str) -> Callable:
  """A jax.checkpoint_policies policy by name; 'save_collectives' keeps COLLECTIVE_OUTPUTS, so
  the backward pass recomputes the stage without repeating its all-gathers and all-to-alls;
  'save_dots_and_collectives' keeps those and every matmul output, so it recomputes only
  elementwise work (grouped matmuls, custom-VJP matmuls and cuDNN's fused attention count as
  matmuls)."""
  policies = jax.checkpoint_policies
  if name == 'save_collectives':
    return policies.save_only_these_names(*COLLECTIVE_OUTPUTS)
  if name == 'save_dots_and_collectives':
    return policies.save_from_both_policies(
        policies.save_from_both_policies(policies.dots_saveable, _fused_attention),
        policies.save_only_these_names(*COLLECTIVE_OUTPUTS, CUSTOM_MATMUL))
  return getattr(policies, name)
