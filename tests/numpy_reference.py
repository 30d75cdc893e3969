"""The whole language model and its loss in plain NumPy (float64), written from the math.

Shares no code with moejax: only the canonical parameter tree's names and shapes are common
(blocks stacked [NB, ...] in block order). One token at a time through its experts, routing
group by routing group; nothing is vectorised that could hide a mistake the model shares.

  embed:  x = tok[id] + pos[t]          (rotary positions: x = tok[id]; q, k rotated)
  block:  x += attn(ln1(x)) ; x += moe(ln2(x))          (GPT-2 pre-LN block; or RMSNorm)
          (dense blocks first, and each block's own before its MoE layer:
           x += attn(ln1(x)) ; x += silu(ln2(x) W1) * (ln2(x) W3) W2)
  attn:   q,k,v = x Wq + bq, ... ; (QK-norm) ; causal softmax(q k^T / sqrt(H)) v ; concat heads ;
          Wo + bo   (grouped-query: query head n reads key/value head n // (N/K))
          (sinks: each row's softmax denominator also holds exp(sink[n]); a sliding window W:
          query t sees keys t-W+1..t in the blocks marked windowed; YaRN: each rotary
          frequency theta_i = base^(-2i/H) with r_i = L_orig theta_i / 2pi turns over the
          original length becomes theta_i / s below beta_slow turns, theta_i above beta_fast,
          linearly between in i; cos and sin times 0.1 ln s + 1)
  moe:    p = softmax(x Wr) ; top-k ; capacity per group (all first choices before any second,
          earlier tokens first) ; y = sum_kept gate * (gelu(x W1[e] + b1[e]) W2[e] + b2[e])
          (router bias: p = softmax(x Wr + br); clamped SwiGLU (GPT-OSS):
          (clip(u, -l, l) + 1) g sigmoid(a g), g = min(x W1 + b1, l), u = x W3 + b3)
          (with in-group balancing, top-k of x Wr + per-expert offsets from Sinkhorn-Knopp
          scaling of the group's exp(logits / temperature); f_e counts the plain top-k)
          + a shared expert on every token: sigmoid(x Wg) (silu(x Ws1) * (x Ws3)) Ws2
  loss:   mean CE over real vocabulary + aux_w * sum_blocks mean_groups E sum_e f_e P_e
          + z_w * sum_blocks mean_groups mean_tokens logsumexp(router logits)^2
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu(x: np.ndarray, form: str = 'exact') -> np.ndarray:
  if form == 'exact':
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None,
               eps: float = 1e-5) -> np.ndarray:
  """LayerNorm with a bias; RMSNorm (no centring) without one."""
  if bias is None:
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def norm(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
  return layer_norm(x, p['scale'], p.get('bias'), eps)


def yarn_frequencies(h: int, base: float, yarn: dict) -> tuple[np.ndarray, float]:
  """YaRN (Peng et al. 2023, section 3.2, as transformers truncates or not): per pair i the
  number of turns r_i its frequency makes over the original length decides between
  interpolation (theta_i / s, r_i < beta_slow) and keeping theta_i (r_i > beta_fast); the
  boundaries are the pair indices where r_i equals beta_fast and beta_slow, with a linear ramp
  in i between them. Returns the frequencies [H/2] and the cos/sin scale 0.1 ln s + 1."""
  s, length = yarn['factor'], yarn['original_len']
  out = np.zeros(h // 2)
  def index_of(turns):   # the real i with L / (2 pi) * base^(-2i/h) == turns
    return h / 2 * math.log(length / (2 * math.pi * turns)) / math.log(base)
  low, high = index_of(yarn['beta_fast']), index_of(yarn['beta_slow'])
  if yarn.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, h - 1)
  for i in range(h // 2):
    theta = base ** (-2.0 * i / h)
    interpolate = min(max((i - low) / (high - low if high != low else 1e-3), 0.0), 1.0)
    out[i] = interpolate * theta / s + (1 - interpolate) * theta
  return out, 0.1 * math.log(s) + 1.0


def rotate(x: np.ndarray, base: float, yarn: dict | None = None) -> np.ndarray:
  """Rotary positions of x [T, H] (position t = row t): pairs (i, i + H/2) by t * base^(-2i/H)
  (YaRN-scaled frequencies and amplitude with `yarn`)."""
  t, h = x.shape
  freq, scale = (base ** (-2.0 * np.arange(h // 2) / h), 1.0) if yarn is None else (
      yarn_frequencies(h, base, yarn))
  angle = np.arange(t)[:, None] * freq                                    # [T, H/2]
  x1, x2 = x[:, :h // 2], x[:, h // 2:]
  cos, sin = scale * np.cos(angle), scale * np.sin(angle)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def latent_attention(x: np.ndarray, p: dict, arch: dict) -> np.ndarray:
  """Multi-head latent attention (DeepSeek-V2 section 2.1, V3 eqs. 1-11) of x [T, D]: the
  latent c = RMSNorm(x W_DKV) and one rotary key k_R = RoPE(x W_KR) per token; per head n, the
  key [c W_UK_n, k_R], the value c W_UV_n, the query [q_C, RoPE(q_R)] from RMSNorm(x W_DQ) W_UQ_n
  (or x W_Q_n); causal softmax of q.k times arch['scale']; heads concatenated, then W_O."""
  t = x.shape[0]
  eps, base = arch.get('eps', 1e-5), arch['rope_base']
  r = p['kv_a_norm'].shape[0]
  rms = lambda a, scale: a / np.sqrt((a ** 2).mean(-1, keepdims=True) + eps) * scale
  down = x @ p['wkv_a']                                     # [T, R + Hr]
  c, k_rot = rms(down[:, :r], p['kv_a_norm']), rotate(down[:, r:], base, arch.get('yarn'))
  if 'wq_a' in p:
    q_all = np.einsum('tr,rnh->tnh', rms(x @ p['wq_a'], p['q_a_norm']), p['wq_b'])
  else:
    q_all = np.einsum('td,dnh->tnh', x, p['wq'])           # [T, N, H + Hr]
  heads, hv = p['wo'].shape[0], p['wo'].shape[1]
  h = p['wkv_b'].shape[-1] - hv
  out = np.zeros((t, heads * hv))
  for n in range(heads):
    key = np.concatenate([c @ p['wkv_b'][:, n, :h], k_rot], axis=1)          # [T, H + Hr]
    value = c @ p['wkv_b'][:, n, h:]                                          # [T, Hv]
    query = np.concatenate([q_all[:, n, :h], rotate(q_all[:, n, h:], base, arch.get('yarn'))],
                           axis=1)
    scores = query @ key.T * arch['scale']
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    out[:, n * hv:(n + 1) * hv] = softmax(scores) @ value
  return out @ p['wo'].reshape(heads * hv, -1)


def attention(x: np.ndarray, p: dict, arch: dict | None = None, window: int = 0) -> np.ndarray:
  """x [T, D] one sequence -> [T, D]. arch: rope_base (None: no rotation), yarn, qk_norm, eps.
  window > 0: each query sees only the `window` positions up to its own."""
  arch = arch or {}
  if 'wkv_a' in p:
    return latent_attention(x, p, arch)
  t = x.shape[0]
  if 'wqkv' in p:
    wq, wk, wv = p['wqkv'][0], p['wqkv'][1], p['wqkv'][2]              # [D, N, H] each
    b = p.get('bqkv')
    bq, bk, bv = (None, None, None) if b is None else (b[0], b[1], b[2])
  else:
    wq, (wk, wv) = p['wq'], p['wkv']                                    # [D, N, H], [D, K, H]
    bq, bk, bv = p.get('bq'), *((None, None) if 'bkv' not in p else p['bkv'])
  n, h, kv = wq.shape[1], wq.shape[2], wk.shape[1]
  proj = lambda w, bias: np.einsum('td,dnh->tnh', x, w) + (0.0 if bias is None else bias)
  q, k, v = proj(wq, bq), proj(wk, bk), proj(wv, bv)                    # [T, N|K, H]
  eps = arch.get('eps', 1e-5)
  if arch.get('qk_norm') == 'full':                                     # over all heads
    q = (q.reshape(t, -1) / np.sqrt((q.reshape(t, -1) ** 2).mean(-1, keepdims=True) + eps)
         ).reshape(q.shape) * p['q_norm']
    k = (k.reshape(t, -1) / np.sqrt((k.reshape(t, -1) ** 2).mean(-1, keepdims=True) + eps)
         ).reshape(k.shape) * p['k_norm']
  elif arch.get('qk_norm') == 'head':
    q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + eps) * p['q_norm']
    k = k / np.sqrt((k ** 2).mean(-1, keepdims=True) + eps) * p['k_norm']
  out = np.zeros((t, n * h))
  for head in range(n):
    qh, kh, vh = q[:, head], k[:, head // (n // kv)], v[:, head // (n // kv)]
    if arch.get('rope_base'):
      qh = rotate(qh, arch['rope_base'], arch.get('yarn'))
      kh = rotate(kh, arch['rope_base'], arch.get('yarn'))
    scores = qh @ kh.T / math.sqrt(h)
    for i in range(t):
      for j in range(t):
        if j > i or (window and i - j >= window):
          scores[i, j] = -np.inf
    if 'sinks' in p:                      # the sink's exp joins each row's denominator
      top = np.maximum(scores.max(-1, keepdims=True), p['sinks'][head])
      e = np.exp(scores - top)
      weights = e / (e.sum(-1, keepdims=True) + np.exp(p['sinks'][head] - top))
    else:
      weights = softmax(scores)
    out[:, head * h:(head + 1) * h] = weights @ vh
  y = out @ p['wo'].reshape(n * h, -1)
  return y + p['bo'] if 'bo' in p else y


def sinkhorn_offsets(scores: np.ndarray, iters: int, anneal: float = 0.03) -> np.ndarray:
  """Per-expert offsets [E] that balance a group's top choices of scores [S, E]: Sinkhorn-Knopp
  scaling of exp(scores / tau) to rows summing to 1 and columns to S/E, at temperatures tau
  from the scores' standard deviation (about each token's mean) down to `anneal` of it; the
  offset is tau * log(column scale)."""
  s, e = scores.shape
  spread = math.sqrt(float(((scores - scores.mean(-1, keepdims=True)) ** 2).mean())) + 1e-6
  offset = np.zeros(e)
  for i in range(iters):
    tau = spread * anneal ** (i / max(iters - 1, 1))
    kernel = np.exp((scores - scores.max() + offset) / tau)   # [S, E] columns scaled already
    rows = kernel / kernel.sum(-1, keepdims=True)
    offset = offset + tau * np.log((s / e) / rows.sum(0))
  return offset


def moe_group(x: np.ndarray, p: dict, *, top_k: int, capacity: int, gelu_form: str,
              normalize_gates: bool | str, sinkhorn_iters: int = 0, clamp: tuple = (),
              deepseek: dict | None = None) -> tuple[np.ndarray, float, float, int, int]:
  """One routing group x [S, D] -> (y [S, D], aux, z, kept, assigned). clamp: (limit, alpha)
  of GPT-OSS's clamped SwiGLU, () for plain SwiGLU. deepseek: DeepSeek-V3's router (section
  2.1.2 of its report): each expert's affinity sigmoid(x Wr); a token's experts are its top-k of
  affinity + bias within the `top_groups` of the `groups` expert groups whose two best
  affinity + bias sum highest (other experts are never chosen); gates the chosen affinities,
  normalised (normalize_gates) and times `scale`."""
  s = x.shape[0]
  num_experts = p['router'].shape[1]
  logits = x @ p['router'] + p.get('router_bias', 0.0)   # [S, E]
  probs = softmax(logits)
  if deepseek:
    probs = 1.0 / (1.0 + np.exp(-logits))                # affinities
    biased = probs + p.get('select_bias', 0.0)
    plain = np.zeros((s, top_k), int)
    size = num_experts // deepseek['groups']
    for i in range(s):
      rank = [sorted(biased[i, g * size:(g + 1) * size])[-2:] for g in range(deepseek['groups'])]
      best = sorted(range(deepseek['groups']), key=lambda g: -sum(rank[g]))[:deepseek['top_groups']]
      allowed = [biased[i, e] if e // size in best else -np.inf for e in range(num_experts)]
      plain[i] = np.argsort(-np.array(allowed), kind='stable')[:top_k]
  else:
    plain = np.argsort(-(logits + p.get('select_bias', 0.0)), axis=-1, kind='stable')[:, :top_k]
  choice = plain
  if sinkhorn_iters:
    balanced = logits + sinkhorn_offsets(logits, sinkhorn_iters)
    choice = np.argsort(-balanced, axis=-1, kind='stable')[:, :top_k]
  used = np.zeros(num_experts, int)
  kept = np.zeros((s, top_k), bool)
  for k in range(top_k):                                # priority: choice rank, then position
    for i in range(s):
      e = choice[i, k]
      if used[e] < capacity:
        used[e] += 1
        kept[i, k] = True
  y = np.zeros_like(x)
  bias = lambda name, e: p[name][e] if name in p else 0.0
  for i in range(s):
    gates = [probs[i, choice[i, k]] if kept[i, k] else 0.0 for k in range(top_k)]
    # normalize_gates True/'kept': over the kept gates; 'top_k': over all top-k choices
    total = (sum(probs[i, choice[i, k]] for k in range(top_k)) if normalize_gates == 'top_k'
             else sum(gates))
    for k in range(top_k):
      if not kept[i, k]:
        continue
      e = choice[i, k]
      gate = gates[k] / total if normalize_gates else gates[k]
      gate *= deepseek['scale'] if deepseek else 1.0
      first = x[i] @ p['w1'][e] + bias('b1', e)
      if 'w3' in p and clamp:
        limit, alpha = clamp
        g = np.minimum(first, limit)
        u = np.clip(x[i] @ p['w3'][e] + bias('b3', e), -limit, limit)
        hidden = (u + 1) * g / (1.0 + np.exp(-alpha * g))
      elif 'w3' in p:                                   # SwiGLU: silu(x W1) * (x W3)
        hidden = first / (1.0 + np.exp(-first)) * (x[i] @ p['w3'][e] + bias('b3', e))
      else:
        hidden = gelu(first, gelu_form)
      y[i] += gate * (hidden @ p['w2'][e] + bias('b2', e))
  if 'shared_w1' in p:                                  # always on, gated when it has a gate
    for i in range(s):
      first = x[i] @ p['shared_w1']
      hidden = (first / (1.0 + np.exp(-first)) * (x[i] @ p['shared_w3']) if 'shared_w3' in p
                else gelu(first, gelu_form))
      scale = 1.0 / (1.0 + np.exp(-(x[i] @ p['shared_gate'])[0])) if 'shared_gate' in p else 1.0
      y[i] += scale * (hidden @ p['shared_w2'])
  frac = np.bincount(plain.reshape(-1), minlength=num_experts) / (s * top_k)
  aux = num_experts * float(np.sum(frac * probs.mean(0)))
  lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
  z = float(np.mean(lse ** 2))
  return y, aux, z, int(kept.sum()), s * top_k


def forward(params: dict, tokens: np.ndarray, *, vocab_size: int, group_size: int, top_k: int,
            capacity: int, aux_weight: float, z_weight: float, gelu_form: str = 'exact',
            normalize_gates: bool | str = False, sinkhorn_iters: int = 0,
            arch: dict | None = None) -> tuple[float, np.ndarray, dict]:
  """tokens [M, B, T+1] -> (loss, logits [M, B, T, vocab_size], stats). arch: the open
  families' options (rope_base for rotary positions, yarn, qk_norm, eps of the norms, window
  and windowed: the sliding window and the blocks it applies to, clamp of the experts)."""
  arch = arch or {}
  eps = arch.get('eps', 1e-5)
  f64 = lambda tree: {k: f64(v) if isinstance(v, dict) else np.asarray(v, np.float64)
                      for k, v in tree.items()}
  params = f64(params)
  emb, head, blocks = params['embed'], params['head'], params['blocks']
  dense = params.get('dense_blocks', {})
  num_dense = dense['ln1']['scale'].shape[0] if dense else 0
  num_blocks = blocks['ln1']['scale'].shape[0]
  at = lambda tree, i: {k: at(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}
  block = lambda b: at(blocks, b)
  inputs, labels = tokens[..., :-1], tokens[..., 1:]
  m, bsz, t = inputs.shape
  logits = np.zeros((m, bsz, t, vocab_size))
  aux = np.zeros((num_blocks, m, bsz * t // group_size))   # a group: a chunk of the micro-batch
  z = np.zeros_like(aux)
  kept = assigned = 0
  hidden = np.zeros((m, bsz, t, emb['tok'].shape[1]))

  def moe_block(x, p, nb, aux_, z_):
    """x [B, T, D] through block p (index nb); fills aux_, z_ [groups]."""
    kept = assigned = 0
    for bi in range(bsz):
      window = arch.get('window', 0) if nb in arch.get('windowed', ()) else 0
      x[bi] = x[bi] + attention(norm(x[bi], p['ln1'], eps), p['attn'], arch, window)
    h = norm(x, p['ln2'], eps).reshape(bsz * t, -1)                   # [B*T, D]
    y = np.zeros_like(h)
    for g in range(bsz * t // group_size):
      sl = slice(g * group_size, (g + 1) * group_size)
      y[sl], aux_[g], z_[g], kk, aa = moe_group(
          h[sl], p['moe'], top_k=top_k, capacity=capacity, gelu_form=gelu_form,
          normalize_gates=normalize_gates, sinkhorn_iters=sinkhorn_iters,
          clamp=arch.get('clamp', ()), deepseek=arch.get('deepseek'))
      kept, assigned = kept + kk, assigned + aa
    return x + y.reshape(bsz, t, -1), kept, assigned

  def dense_block(x, p):
    """x [B, T, D] through a dense block: attention, then a SwiGLU MLP."""
    for bi in range(bsz):
      x[bi] = x[bi] + attention(norm(x[bi], p['ln1'], eps), p['attn'], arch)
      h = norm(x[bi], p['ln2'], eps)
      first = h @ p['mlp']['w1']
      x[bi] = x[bi] + (first / (1.0 + np.exp(-first)) * (h @ p['mlp']['w3'])) @ p['mlp']['w2']

  for mi in range(m):
    x = emb['tok'][inputs[mi]] + (emb['pos'][:t] if 'pos' in emb else 0.0)  # [B, T, D]
    for nd in range(num_dense):       # dense blocks first
      dense_block(x, at(dense, nd))
    for nb in range(num_blocks):      # each block: its own dense blocks, then its MoE layer
      p = block(nb)
      for i in range(sum(name.startswith('dense_') for name in p)):
        dense_block(x, p[f'dense_{i}'])
      x, k_, a_ = moe_block(x, p, nb, aux[nb, mi], z[nb, mi])
      kept, assigned = kept + k_, assigned + a_
    hidden[mi] = x
    logits[mi] = norm(x, head['ln_f'], eps) @ head['w'][:, :vocab_size]
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  label_logit = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  ce = float(np.mean(lse - label_logit))
  loss = ce
  if 'mtp' in params:   # multi-token prediction (DeepSeek-V3 section 2.2)
    mtp_ce, mtp_aux, mtp_z, kk, aa = mtp(params, hidden, inputs, labels, moe_block, eps,
                                         vocab_size, bsz * t // group_size)
    kept, assigned = kept + kk, assigned + aa
    aux, z = np.concatenate([aux, mtp_aux]), np.concatenate([z, mtp_z])
    loss = ce + arch['mtp_weight'] * mtp_ce
  aux_loss = aux_weight * float(aux.mean(axis=(1, 2)).sum())
  z_loss = z_weight * float(z.mean(axis=(1, 2)).sum())
  stats = {'ce': ce, 'aux_loss': aux_loss, 'z_loss': z_loss,
           'dropped_frac': 1.0 - kept / assigned}
  if 'mtp' in params:
    stats['mtp_ce'] = mtp_ce
  return loss + aux_loss + z_loss, logits, stats


def mtp(params: dict, hidden: np.ndarray, inputs: np.ndarray, labels: np.ndarray, moe_block,
        eps: float, vocab_size: int, groups: int) -> tuple:
  """DeepSeek-V3's multi-token prediction: depth k turns h^{k-1}_i (h^0: the last block's
  output) and Emb(t_{i+k}) into h^k_i = Block(M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]),
  which predicts t_{i+k+1} through its own final norm and the shared head. Returns the mean
  over depths of each depth's CE (over the positions i with t_{i+k+1} in the row; the last k
  positions embed token 0, predicting nothing), the aux and z values [depths, M, groups] of
  the depths' blocks, and their kept and assigned counts."""
  m, bsz, t = inputs.shape
  depths = params['mtp']['proj'].shape[0]
  num_blocks = params['blocks']['ln1']['scale'].shape[0]
  aux, z = np.zeros((depths, m, groups)), np.zeros((depths, m, groups))
  ces, h, kept, assigned = [], hidden.copy(), 0, 0
  for k in range(1, depths + 1):
    take = lambda tree: {n: take(v) if isinstance(v, dict) else v[k - 1]
                         for n, v in tree.items()}
    p = take(params['mtp'])
    nll = []
    for mi in range(m):
      # Emb(t_{i+k}); past T - k (no such token) token 0's, whose rows predict nothing but
      # take their places in the block's expert capacity
      ids = np.concatenate([inputs[mi][:, k:], np.zeros((bsz, k), int)], axis=1)
      e = params['embed']['tok'][ids]
      joined = (norm(e, p['enorm'], eps) @ p['proj'][0] +
                norm(h[mi], p['hnorm'], eps) @ p['proj'][1])
      h[mi], kk, aa = moe_block(joined, p['block'], num_blocks + k - 1, aux[k - 1, mi],
                                z[k - 1, mi])
      kept, assigned = kept + kk, assigned + aa
      logits = (norm(h[mi], p['ln_f'], eps) @ params['head']['w'][:, :vocab_size])[:, :t - k]
      target = labels[mi][:, k:]                     # t_{i+k+1}, i < T - k
      lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
      nll.append(lse - np.take_along_axis(logits, target[..., None], -1)[..., 0])
    ces.append(np.mean(nll))
  return float(np.mean(ces)), aux, z, kept, assigned
