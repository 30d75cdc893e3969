"""Sampling from a trained model: the token choice (greedy, temperature, top-k, top-p) and the
two generation loops, each one compiled program:

- cached: the prompt fills a key/value cache in one pass, then one step per new token over the
  cache (moejax.model.decode); meshes without pipeline stages (pp=1).
- windowed: every new token re-runs the whole model over the fixed context window
  (transformer.next_token_logits); any mesh, pp samples at once (one per micro-batch).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import ConfigError
from moejax.model import decode, params as params_lib, transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # keep the k most likely tokens (0: all)
  top_p: float = 1.0         # keep the smallest set of tokens with probability >= top_p


def choose(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [...] from logits [..., V] (float32)."""
  if s.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k > 0:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -1e30, logits)
  if s.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]                # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                        # mass of likelier tokens
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -1e30, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_cached(plan, prompt_len: int, max_new_tokens: int) -> None:
  """Raises ConfigError when the plan's mesh or model cannot generate with a cache."""
  if plan.layout.pp > 1:
    raise ConfigError(f'Generation with a KV cache runs on meshes without pipeline stages '
                      f'(pp=1, any tp); this plan has pp={plan.layout.pp}. Use --pp=1, or '
                      f'--nocache for the windowed sampler on any mesh.')
  if plan.model.positions == 'learned' and prompt_len + max_new_tokens > plan.model.max_len:
    raise ConfigError(f'prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceeds the '
                      f'position table model.max_len={plan.model.max_len}; shorten them.')


def cached_program(plan, prompt_len: int, max_new_tokens: int, s: Sampling):
  """plan.jit(run)(params, prompt [B, P] int32, key) -> new tokens [B, max_new_tokens]."""
  cfg = plan.model
  check_cached(plan, prompt_len, max_new_tokens)
  length = prompt_len + max_new_tokens

  def run(params, prompt, key):
    params = params_lib.tree_from_stages(params)                        # blocks [NB, ...]
    cache = decode.empty_cache(cfg, prompt.shape[0], length)
    logits, cache = decode.extend(params, cache, prompt, 0, cfg=cfg)   # [B, P, V]
    key, sub = jax.random.split(key)
    token = choose(logits[:, -1], sub, s)                               # [B]
    out = jnp.zeros((prompt.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(token)

    def body(i, carry):
      out, cache, key, token = carry
      logits, cache = decode.extend(params, cache, token[:, None], prompt_len + i, cfg=cfg)
      key, sub = jax.random.split(key)
      token = choose(logits[:, 0], sub, s)
      return out.at[:, i + 1].set(token), cache, key, token
    return jax.lax.fori_loop(0, max_new_tokens - 1, body, (out, cache, key, token))[0]
  return plan.jit(run)


def windowed_program(plan, prompt_len: int, max_new_tokens: int, s: Sampling):
  """plan.jit(run)(params, window [M, 1, W] int32 with the prompt at the start, key) -> the
  window with max_new_tokens new tokens after the prompt."""
  cfg, lay = plan.model, plan.layout
  if prompt_len + max_new_tokens > lay.seq_len:
    raise ConfigError(f'prompt ({prompt_len} tokens) + {max_new_tokens} new tokens exceeds the '
                      f'context window data.seq_len={lay.seq_len}; shorten them.')

  def run(params, tokens, key):
    def body(i, carry):
      tokens, key = carry
      pos = prompt_len - 1 + i
      logits = transformer.next_token_logits(params, tokens, pos, cfg=cfg, lay=lay)  # [M, 1, V]
      key, sub = jax.random.split(key)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, choose(logits, sub, s), pos + 1, 2)
      return tokens, key
    return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, key))[0]
  return plan.jit(run)


def generate(plan, params: Any, prompt_ids: list[int], max_new_tokens: int, s: Sampling,
             seed: int = 0, cache: bool = True) -> np.ndarray:
  """Token ids [n, prompt + new]: one sequence with the cache, pp without (params: the
  plan's training layout)."""
  if not prompt_ids:
    raise ConfigError('The prompt is empty; pass --prompt="some text".')
  p = len(prompt_ids)
  key = jax.random.key(seed)
  if cache:
    prompt = jnp.asarray([prompt_ids], jnp.int32)
    new = cached_program(plan, p, max_new_tokens, s)(params, prompt, key)
    return np.concatenate([np.asarray(prompt), np.asarray(jax.device_get(new))], axis=1)
  lay = plan.layout
  window = np.zeros((lay.num_micro_batches, 1, lay.seq_len), np.int32)
  window[:, 0, :p] = prompt_ids
  out = windowed_program(plan, p, max_new_tokens, s)(
      params, jax.device_put(window, plan.batch_sharding), key)
  return np.asarray(jax.device_get(out))[:, 0, :p + max_new_tokens]

