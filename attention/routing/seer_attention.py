"""SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (Gao et al., 2024).

A small learnable gate (AttnGate) predicts which b x b blocks of the attention map
matter, from pooled pre-RoPE queries and keys:

    Q~ = avgpool_b(Q) [W_q]                        (W_q only when d_gate != head_dim)
    K~ = W_k [maxpool_b(K); minpool_b(K); avgpool_b(K)]      (per query head, 3d -> d_gate)
    (optional RoPE on Q~, K~ at the block positions 0, b, 2b, ...)
    S  = Q~ K~^T / sqrt(d_gate) + block-causal mask                 [B, N, n, n]

At inference a q block attends to its row top-k blocks (k = floor((1 - sqrt(1 - nz))
n) for a causal density nz, `top_k_for_density`) or to the blocks with softmax(S) >
tau. The gate is trained by self-distillation on a frozen model: the target is the
true attention map pooled to blocks, G[i, j] = max of the attention probabilities over
tile (i, j), rows normalised to 1 (`attention_block_target`, computed q block by q
block from the log-sum-exp, never as a T x S array), and the loss is
KL(G || softmax S) with the first quarter of the block rows dropped (`seer_kl_loss`),
summed over layers and scaled by 10 (`train_attn_gates`). Only the gate's linears
learn; the model's attention runs on the chosen blocks (`seer_sparse_attention`).

Einsum letters: b batch, t/s positions, i/j blocks, n query heads, k kv heads,
g query heads per kv head, h head dim, c pooled features (3 h), d gate dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attention import api
from attention.masks import dynamic
from attention.routing import _common

POOLS = ('avg', 'max', 'min')


def _check_divides(block_size: int, length: int) -> int:
  block_size = _common.check_int('block_size', block_size)
  if length % block_size:
    raise ValueError(f'block_size ({block_size}) must divide the sequence length '
                     f'({length}) (SeerAttention pools whole blocks).')
  return block_size


def pool_blocks(x: jax.Array, block_size: int, how: str = 'avg') -> jax.Array:
  """x [B, T, K, H] pooled over blocks of block_size positions -> [B, n, K, H]."""
  _common.check_qk(x, x)
  block_size = _check_divides(block_size, x.shape[1])
  if how not in POOLS:
    raise ValueError(f'how must be one of {POOLS}, got {how!r}.')
  b, t, kh, h = x.shape
  blocks = x.reshape(b, t // block_size, block_size, kh, h)
  return {'avg': jnp.mean, 'max': jnp.max, 'min': jnp.min}[how](blocks, axis=2)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding (RoFormer), rotate-half layout, of x [B, T, N, H] at positions
  [T] (the convention of the models in experiments/)."""
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f'RoPE needs an even feature size, got {h}.')
  dt = jnp.promote_types(x.dtype, jnp.float32)
  freqs = base ** (-jnp.arange(0, h // 2, dtype=dt) / (h // 2))
  angles = positions.astype(dt)[:, None] * freqs[None, :]  # [T, H/2]
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(dt), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def block_causal(n: int) -> np.ndarray:
  """bool [n, n]: kv block j <= q block i."""
  return np.tril(np.ones((n, n), bool))


def attn_gate_scores(query: jax.Array, key: jax.Array, *, wk: jax.Array,
                     wq: jax.Array | None = None, block_size: int,
                     rope_base: float | None = None,
                     causal: bool = True) -> jax.Array:
  """AttnGate block scores S [B, N, n, n] (float32; -inf above the diagonal if causal).

  Args:
    query: pre-RoPE [B, T, N, H]; key: pre-RoPE [B, T, K, H].
    wk: [N, 3H, D] (per query head, over [max; min; avg] pooled K of its kv head).
    wq: [N, H, D] or None (then D must equal H).
    block_size: b, dividing T.
    rope_base: RoPE base for Q~, K~ at positions 0, b, 2b, ... (None: no RoPE).
  """
  _, t, n, kh, h = _common.check_qk(query, key)
  block_size = _check_divides(block_size, t)
  if wk.ndim != 3 or tuple(wk.shape[:2]) != (n, 3 * h):
    raise ValueError(f'wk must have shape [N, 3H, D] = [{n}, {3 * h}, D], got '
                     f'{tuple(wk.shape)}.')
  d = wk.shape[2]
  if wq is None and d != h:
    raise ValueError(f'wq must be given when the gate dim ({d}) != head_dim ({h}).')
  if wq is not None and tuple(wq.shape) != (n, h, d):
    raise ValueError(f'wq must have shape [N, H, D] = {(n, h, d)}, got '
                     f'{tuple(wq.shape)}.')
  dt = jnp.promote_types(query.dtype, jnp.float32)
  query, key = query.astype(dt), key.astype(dt)
  q_pool = pool_blocks(query, block_size)  # [B, n, N, H]
  k_pool = jnp.concatenate([pool_blocks(key, block_size, p) for p in
                            ('max', 'min', 'avg')], -1)  # [B, n, K, 3H]
  g = n // kh
  q_gate = (q_pool if wq is None else
            jnp.einsum('binh,nhd->bind', q_pool, wq.astype(dt)))  # [B, n, N, D]
  k_gate = jnp.einsum('bjkc,kgcd->bjkgd', k_pool,
                      wk.astype(dt).reshape(kh, g, 3 * h, d))  # [B, n, K, G, D]
  k_gate = k_gate.reshape(k_gate.shape[:2] + (n, d))  # [B, n, N, D]
  if rope_base is not None:
    pos = jnp.arange(q_gate.shape[1]) * block_size
    q_gate, k_gate = rope(q_gate, pos, rope_base), rope(k_gate, pos, rope_base)
  s = jnp.einsum('bind,bjnd->bnij', q_gate, k_gate) / math.sqrt(d)  # [B, N, n, n]
  if causal:
    s = jnp.where(block_causal(s.shape[-1]), s, -jnp.inf)
  return s


class AttnGate(nnx.Module):
  """SeerAttention's AttnGate: owns W_k (and W_q); returns block scores S."""

  def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *,
               block_size: int = 64, gate_dim: int = 128,
               q_proj: bool | None = None, rope_base: float | None = None,
               rngs: nnx.Rngs):
    for name, v in (('num_heads', num_heads), ('num_kv_heads', num_kv_heads),
                    ('head_dim', head_dim), ('gate_dim', gate_dim)):
      _common.check_int(name, v)
    if num_heads % num_kv_heads:
      raise ValueError(f'num_heads ({num_heads}) must be a multiple of num_kv_heads '
                       f'({num_kv_heads}).')
    self.block_size = _common.check_int('block_size', block_size)
    self.rope_base = rope_base
    q_proj = gate_dim != head_dim if q_proj is None else bool(q_proj)
    if not q_proj and gate_dim != head_dim:
      raise ValueError(f'q_proj must be True when gate_dim ({gate_dim}) != head_dim '
                       f'({head_dim}).')
    self.wk = _common.lecun_param(rngs, (num_heads, 3 * head_dim, gate_dim),
                                  3 * head_dim, ('heads', None, None))
    self.wq = (_common.lecun_param(rngs, (num_heads, head_dim, gate_dim), head_dim,
                                   ('heads', 'head_dim', None)) if q_proj else None)

  def __call__(self, query: jax.Array, key: jax.Array, *, causal: bool = True,
               block_size: int | None = None) -> jax.Array:
    """Pre-RoPE query [B, T, N, H], key [B, T, K, H] -> S [B, N, n, n]
    (block_size overrides the gate's own)."""
    return attn_gate_scores(query, key, wk=self.wk[...],
                            wq=None if self.wq is None else self.wq[...],
                            block_size=block_size or self.block_size,
                            rope_base=self.rope_base, causal=causal)


def top_k_for_density(density: float, num_blocks: int) -> int:
  """k = floor((1 - sqrt(1 - nz)) n) (at least 1): the row top-k whose causal
  block map keeps about a fraction nz of the lower triangle (SeerAttention)."""
  density = _common.check_fraction('density', density)
  num_blocks = _common.check_int('num_blocks', num_blocks)
  return max(1, int(math.floor((1.0 - math.sqrt(1.0 - density)) * num_blocks)))


def seer_mask(scores: jax.Array, *, block_size: int, q_len: int,
              top_k: int | None = None, threshold: float | None = None,
              keep_diagonal: bool = True, dense_last_rows: int = 0,
              budget: int | None = None) -> dynamic.DynamicBlockMask:
  """The blocks SeerAttention attends to, from gate scores S [B, N, n, n].

  Exactly one of `top_k` (row top-k, in [1, n]) or `threshold` (softmax(S) > tau).
  keep_diagonal: the own block is always kept (counts toward top_k), so no row is
  empty. dense_last_rows: the last rows attend to every eligible block (the code
  keeps 2). budget: list width for the threshold rule (default n).
  """
  if (top_k is None) == (threshold is None):
    raise ValueError('exactly one of top_k or threshold must be given, got '
                     f'top_k={top_k!r}, threshold={threshold!r}.')
  block_size = _check_divides(block_size, q_len)
  n = q_len // block_size
  if not hasattr(scores, 'shape') or scores.ndim != 4 or tuple(
      scores.shape[2:]) != (n, n):
    raise ValueError(f'scores must have shape [B, N, {n}, {n}], got '
                     f'{getattr(scores, "shape", type(scores).__name__)}.')
  dense_last_rows = _common.check_int('dense_last_rows', dense_last_rows, 0)
  scores = jax.lax.stop_gradient(scores)
  eligible = scores > -jnp.inf
  diag = jnp.eye(n, dtype=bool) & eligible if keep_diagonal else None
  geometry = dict(q_len=q_len, kv_len=q_len, block_q=block_size,
                  block_kv=block_size)
  if top_k is not None:
    top_k = _common.check_int('top_k', top_k)
    if top_k > n:
      raise ValueError(f'top_k must be in [1, {n}] (the number of blocks), got '
                       f'{top_k}.')
    m = dynamic.top_k_blocks(scores, top_k, always=diag, **geometry)
  else:
    tau = _common.check_fraction('threshold', threshold, low_open=False)
    probs = jax.nn.softmax(scores, axis=-1)
    blocks = (probs > tau) & eligible
    if keep_diagonal:
      blocks = blocks | diag
    m = dynamic.from_block_matrix(blocks, budget=n if budget is None else budget,
                                  **geometry)
  if dense_last_rows:
    rows = np.arange(n) >= n - dense_last_rows
    m = dynamic.union(m, eligible & rows[:, None])
  return m


def seer_sparse_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          scores: jax.Array, *, block_size: int,
                          top_k: int | None = None, threshold: float | None = None,
                          causal: bool = True, keep_diagonal: bool = True,
                          implementation: str | None = None) -> jax.Array:
  """Attention of (post-RoPE) query/key/value over the blocks the gate scores pick."""
  _common.check_qk(query, key, value)
  m = seer_mask(scores, block_size=block_size, q_len=query.shape[1], top_k=top_k,
                threshold=threshold, keep_diagonal=keep_diagonal)
  return api.dot_product_attention(query, key, value, mask=m, is_causal=causal,
                                   implementation=implementation)


def attention_block_target(query: jax.Array, key: jax.Array, *, block_size: int,
                           causal: bool = True, scale: float | None = None,
                           implementation: str | None = None) -> jax.Array:
  """The distillation target G [B, N, n, n] (float32, rows sum to 1, no gradient).

  G[i, j] = max over tile (i, j) of the attention probabilities
  exp(scale q_t.k_s - lse_t), then each row normalised. The lse comes from
  `attention.dot_product_attention(..., return_residuals=True)`; the tiles are
  visited one q block at a time (`lax.map`), each step O(block_size x S), so no
  T x S array is ever built (with an implementation that does not build one).

  Args:
    query: post-RoPE [B, T, N, H]; key: post-RoPE [B, T, K, H] (the model's own).
  """
  b, t, n, kh, h = _common.check_qk(query, key)
  block_size = _check_divides(block_size, t)
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  dummy = jnp.zeros(key.shape[:3] + (1,), key.dtype)
  _, lse = api.dot_product_attention(query, key, dummy, is_causal=causal,
                                     scale=scale, return_residuals=True,
                                     implementation=implementation)  # [B, N, T]
  nb, g = t // block_size, n // kh
  dt = jnp.promote_types(query.dtype, jnp.float32)
  q_blocks = jnp.moveaxis(query.astype(dt).reshape(b, nb, block_size, kh, g, h),
                          1, 0)  # [n, B, b, K, G, H]
  lse_blocks = jnp.moveaxis(lse.astype(dt).reshape(b, n, nb, block_size), 2, 0)
  kv_pos = jnp.arange(t)

  def one_block(args):
    i, q_i, lse_i = args  # q_i [B, b, K, G, H], lse_i [B, N, b]
    logits = jnp.einsum('btkgh,bskh->bkgts', q_i, key.astype(dt)) * scale
    logits = logits.reshape(b, n, block_size, t)  # [B, N, b, S]
    p = jnp.exp(logits - jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)[..., None])
    if causal:
      q_pos = i * block_size + jnp.arange(block_size)
      p = jnp.where(kv_pos[None, :] <= q_pos[:, None], p, 0.0)
    return jnp.max(p.reshape(b, n, block_size, nb, block_size), axis=(2, 4))

  tiles = jax.lax.map(one_block, (jnp.arange(nb), q_blocks, lse_blocks))
  tiles = jnp.moveaxis(tiles, 0, 2)  # [B, N, n, n]
  total = jnp.sum(tiles, -1, keepdims=True)
  return tiles / jnp.where(total > 0, total, 1.0)


def seer_kl_loss(target: jax.Array, scores: jax.Array, *,
                 skip_fraction: float = 0.25) -> jax.Array:
  """KL(G || softmax S), mean over batch, heads and the kept block rows.

  Rows i < floor(skip_fraction * n) are dropped (the first quarter in the paper: few
  blocks, little to learn). 0 log 0 = 0; S may hold -inf where G is 0.
  """
  if target.shape != scores.shape or target.ndim != 4:
    raise ValueError(f'target and scores must have the same shape [B, N, n, n], got '
                     f'{tuple(target.shape)} and {tuple(scores.shape)}.')
  skip_fraction = _common.check_fraction('skip_fraction', skip_fraction,
                                         low_open=False)
  n = target.shape[2]
  start = int(math.floor(skip_fraction * n))
  g, s = target[:, :, start:], scores[:, :, start:]
  log_p = jax.nn.log_softmax(s, axis=-1)
  terms = jnp.where(g > 0, g * (jnp.log(jnp.where(g > 0, g, 1.0)) -
                                jnp.where(g > 0, log_p, 0.0)), 0.0)
  return jnp.mean(jnp.sum(terms, -1))


# A layer's (pre-RoPE q, pre-RoPE k, post-RoPE q, post-RoPE k) of a frozen model.
LayerQK = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


class _Gates(nnx.Module):

  def __init__(self, gates: Sequence[AttnGate]):
    self.gates = nnx.List(list(gates))


def distillation_loss(gates: Sequence[AttnGate], layers: Sequence[LayerQK], *,
                      skip_fraction: float = 0.25, loss_scale: float = 10.0,
                      causal: bool = True,
                      implementation: str | None = None) -> jax.Array:
  """loss_scale x sum over layers of KL(G || softmax S) (SeerAttention's objective)."""
  if len(gates) != len(layers):
    raise ValueError(f'layers must hold one (q, k, q_rope, k_rope) per gate '
                     f'({len(gates)}), got {len(layers)}.')
  total = 0.0
  for gate, (q, k, q_rope, k_rope) in zip(gates, layers):
    target = attention_block_target(q_rope, k_rope, block_size=gate.block_size,
                                    causal=causal, implementation=implementation)
    scores = gate(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k),
                  causal=causal)
    total = total + seer_kl_loss(target, scores, skip_fraction=skip_fraction)
  return loss_scale * total


def gate_value_and_grad(gates: Sequence[AttnGate], layers: Sequence[LayerQK],
                        **loss_kwargs) -> tuple[jax.Array, Any]:
  """(loss, gradient) of `distillation_loss` wrt the gates' parameters only.

  The gradient is an `nnx.State` of the gates' Params: nothing else (in particular
  no parameter of the model that produced `layers`) is differentiated.
  """
  container = _Gates(gates)
  graphdef, params, rest = nnx.split(container, nnx.Param, ...)
  layers = jax.lax.stop_gradient(list(layers))

  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest)
    return distillation_loss(list(model.gates), layers, **loss_kwargs)

  return jax.value_and_grad(loss_fn)(params)


def train_attn_gates(gates: Sequence[AttnGate],
                     layer_qk: Callable[[int], Sequence[LayerQK]], *,
                     num_steps: int, learning_rate: float = 1e-3,
                     skip_fraction: float = 0.25, loss_scale: float = 10.0,
                     causal: bool = True, implementation: str | None = None
                    ) -> tuple[list[AttnGate], np.ndarray]:
  """Trains only the gates (Adam) by self-distillation; returns (gates, losses).

  Args:
    gates: one AttnGate per layer (updated in place and returned).
    layer_qk: step -> per-layer (q, k, q_rope, k_rope) of the FROZEN model on that
      step's batch (pre-RoPE q/k feed the gate, post-RoPE ones the target); the
      model's parameters never enter the differentiated function.
    num_steps: optimisation steps.
  Returns:
    (the trained gates, float32 [num_steps] losses before each update).
  """
  num_steps = _common.check_int('num_steps', num_steps)
  container = _Gates(gates)
  graphdef, params, rest = nnx.split(container, nnx.Param, ...)
  opt = optax.adam(learning_rate)
  opt_state = opt.init(params)
  kw = dict(skip_fraction=skip_fraction, loss_scale=loss_scale, causal=causal,
            implementation=implementation)

  @jax.jit
  def step(params, opt_state, layers):
    loss, grads = gate_value_and_grad(
        list(nnx.merge(graphdef, params, rest).gates), layers, **kw)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(num_steps):
    layers = [tuple(jax.lax.stop_gradient(x) for x in qk) for qk in layer_qk(i)]
    params, opt_state, loss = step(params, opt_state, layers)
    losses.append(float(loss))
  nnx.update(container, params)
  return list(container.gates), np.asarray(losses, np.float32)


class SeerAttention(nnx.Module):
  """Self-attention layer x [B, T, D] -> [B, T, D] with an AttnGate choosing blocks.

  Owns q / k / v / output projections (num_heads query and kv heads) and the gate.
  RoPE (rope_base, None for none) is applied to q, k for attention; the gate sees
  the pre-RoPE q, k (stop_gradient'ed: the LM loss never trains the gate, which
  learns from `gate_loss` / `train_attn_gates`). block_size None: T // num_blocks
  (T must be a multiple of num_blocks); top_k is clipped to the number of blocks.

  With `distill_weight` > 0 the call returns (y, {'seer_gate_kl': weight * KL}): the
  gate's distillation loss on this very forward pass (the target from stop-gradient
  q, k, so it trains the gate only), which a trainer adds to its loss (the paper's
  weight is 10, summed over layers).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, causal: bool = True,
               block_size: int | None = None, num_blocks: int = 8, top_k: int = 3,
               gate_dim: int | None = None, rope_base: float | None = 10000.0,
               gate_rope: bool = False, implementation: str | None = None,
               distill_weight: float = 0.0, rngs: nnx.Rngs):
    for name, v in (('dim', dim), ('num_heads', num_heads), ('head_dim', head_dim),
                    ('num_blocks', num_blocks), ('top_k', top_k)):
      _common.check_int(name, v)
    if (isinstance(distill_weight, bool) or
        not isinstance(distill_weight, (int, float)) or distill_weight < 0):
      raise ValueError(
          f'distill_weight must be a float >= 0, got {distill_weight!r}.')
    self.distill_weight = float(distill_weight)
    self.causal, self.rope_base = bool(causal), rope_base
    self.block_size, self.num_blocks, self.top_k = block_size, num_blocks, top_k
    self.implementation = implementation
    p = lambda shape, fan, axes: _common.lecun_param(rngs, shape, fan, axes)
    self.wq = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wk = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wv = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wo = p((num_heads, head_dim, dim), num_heads * head_dim,
                ('heads', 'head_dim', 'embed'))
    self.gate = AttnGate(num_heads, num_heads, head_dim,
                         block_size=block_size or num_blocks,
                         gate_dim=gate_dim or min(128, head_dim),
                         rope_base=rope_base if gate_rope else None, rngs=rngs)

  def _block(self, t: int) -> int:
    if self.block_size is not None:
      return self.block_size
    if t % self.num_blocks:
      raise ValueError(f'sequence length ({t}) must be a multiple of num_blocks '
                       f'({self.num_blocks}) when block_size is None.')
    return t // self.num_blocks

  def qk(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """(q, k, v, q_rope, k_rope) of x [B, T, D]."""
    dtype = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dtype))  # [B, T, N, H]
    k = jnp.einsum('btd,dnh->btnh', x, self.wk[...].astype(dtype))  # [B, T, N, H]
    v = jnp.einsum('btd,dnh->btnh', x, self.wv[...].astype(dtype))  # [B, T, N, H]
    if self.rope_base is None:
      return q, k, v, q, k
    pos = jnp.arange(x.shape[1])
    return (q, k, v, rope(q, pos, self.rope_base).astype(dtype),
            rope(k, pos, self.rope_base).astype(dtype))

  def _scores(self, q, k):
    return self.gate(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k),
                     causal=self.causal, block_size=self._block(q.shape[1]))

  def gate_loss(self, x: jax.Array, skip_fraction: float = 0.25) -> jax.Array:
    """KL(G || softmax S) of this layer on x (the distillation side loss)."""
    q, k, _, q_rope, k_rope = self.qk(x)
    target = attention_block_target(q_rope, k_rope, block_size=self._block(
        x.shape[1]), causal=self.causal)
    return seer_kl_loss(target, self._scores(q, k), skip_fraction=skip_fraction)

  def __call__(self, x: jax.Array):
    q, k, v, q_rope, k_rope = self.qk(x)
    scores = self._scores(q, k)
    out = seer_sparse_attention(q_rope, k_rope, v, scores,
                                block_size=self._block(x.shape[1]),
                                top_k=min(self.top_k, scores.shape[-1]),
                                causal=self.causal,
                                implementation=self.implementation)  # [B, T, N, H]
    y = jnp.einsum('btnh,nhd->btd', out.astype(x.dtype),
                   self.wo[...].astype(x.dtype))  # [B, T, D]
    if not self.distill_weight:
      return y
    sg = jax.lax.stop_gradient
    target = attention_block_target(sg(q_rope), sg(k_rope),
                                    block_size=self._block(x.shape[1]),
                                    causal=self.causal)
    kl = seer_kl_loss(target, scores)
    return y, {'seer_gate_kl': self.distill_weight * kl}
