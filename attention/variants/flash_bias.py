"""FlashBias: attention with a low-rank bias as attention over augmented heads.

"FlashBias: Fast Computation of Attention with Bias" (Wu et al., 2025). A bias of
rank R per query head, bias[b, n, i, j] = U[b, i, n] . V[b, j, k(n)], is exact as
plain attention over heads augmented by R columns:

    q' = [scale q, U]   [B, T, N, H + R]      k' = [k, V]   [B, S, K, H + R]
    q' . k' = scale q . k + U . V        (run with scale=1 passed explicitly)

so any implementation of `attention.dot_product_attention` (the float64 reference,
xla, both Pallas kernels) runs it with no [T, S] bias array and no bias reads: only q
and k change (the value head dim H_v is untouched, so H_v != H + R is fine). GQA: key
head k is shared by the query heads n with n // (N / K) = k, so V is per kv head and
the head-dependent factor lives on the query side (U per query head).

Exactly low rank (`alibi_factors`, `linear_bias_factors`): ALiBi's m_n (j - i) and any
bias a_n i + c_n j + g_n are rank 2 (U = [a_n i + g_n, c_n], V = [1, j], positions
centred to halve the magnitudes the dot product accumulates). A general bias is
factored by a truncated SVD (`svd_bias_factors`, the paper's offline decomposition for
static biases), which returns the relative Frobenius error; for GQA the SVD of the
group's stacked biases gives the optimal shared key factor.

Precision: the augmented columns carry magnitudes up to ~max|slope| * T / 2, so in
float32 the logits of the low-rank path carry an absolute error of ~that times 2^-24
(0.5 * 8192 * 6e-8 = 2.4e-4 at T = 16384 for the steepest ALiBi head; measured on
CPU, xla, T = 16384, N = 8, H = 64: output relative error 2.5e-5 vs ALiBi as a
score_mod). float32 matmuls must run at full precision (the xla and reference
implementations use Precision.HIGHEST; TF32 / one-pass bfloat16 would lose the bias),
and bfloat16 inputs cannot represent positions beyond 256 exactly. Pallas GPU pads
head dims to a power of two, so H = 64 plus R = 2 becomes 128 there.

Einsum letters: b batch, t query position, s key position, n query head, k kv head,
g query head within its kv group, r rank, h head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api as attention_api
from attention import score_mods


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')
  return int(value)


def _check_vector(name: str, x: Any, n: int) -> jax.Array:
  _checks.check_array(name, x, ndim=1, floating=True)
  if x.shape[0] != n:
    raise ValueError(f'{name} must have shape [N] = ({n},), got {tuple(x.shape)}.')
  return jnp.asarray(x)


# ----------------------------------------------------------------------------------------
# Low-rank factors.
# ----------------------------------------------------------------------------------------


def linear_bias_factors(q_coef: jax.Array, kv_coef: jax.Array, q_len: int,
                        kv_len: int, *, offset: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Rank-2 factors of bias[n, i, j] = q_coef[n] i + kv_coef[n] j + offset[n].

  Positions are centred at c = (max(T, S) - 1) / 2 (exact: the constant moves into
  the query factor), which halves the magnitudes the dot product accumulates:
  U[i, n] = [q_coef[n] (i - c) + g'[n], kv_coef[n]] with g' = offset + (q_coef +
  kv_coef) c, and V[j] = [1, j - c], shared by every head (it fits any K).

  Args:
    q_coef, kv_coef: [N] per-query-head coefficients of i and j.
    q_len, kv_len: T and S.
    offset: [N] constant per head (default 0).

  Returns:
    (U [1, T, N, 2], V [1, S, 1, 2]) float32 (float64 under x64 for float64 inputs).
  """
  _checks.check_array('q_coef', q_coef, ndim=1, floating=True)
  n = q_coef.shape[0]
  kv_coef = _check_vector('kv_coef', kv_coef, n)
  t = _check_int('q_len', q_len)
  s = _check_int('kv_len', kv_len)
  dt = jnp.result_type(q_coef, kv_coef)
  offset = (jnp.zeros((n,), dt) if offset is None
            else _check_vector('offset', offset, n))
  c = (max(t, s) - 1) / 2.0
  i = jnp.arange(t, dtype=dt)[:, None] - c  # [T, 1]
  j = jnp.arange(s, dtype=dt)[:, None] - c  # [S, 1]
  # a i + cc j + g = a (i - c) + cc (j - c) + (g + (a + cc) c).
  const = offset + (q_coef + kv_coef) * c  # [N]
  u = jnp.stack([q_coef[None, :] * i + const[None, :],
                 jnp.broadcast_to(kv_coef[None, :], (t, n))], axis=-1)  # [T, N, 2]
  v = jnp.concatenate([jnp.ones((s, 1), dt), j], axis=-1)[:, None, :]  # [S, 1, 2]
  return u[None].astype(dt), v[None].astype(dt)


def alibi_factors(num_heads: int, q_len: int, kv_len: int, *,
                  slopes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Rank-2 factors of ALiBi's bias m_n (j - i) ("Train Short, Test Long").

  The (causal) ALiBi of `attention.score_mods.alibi` (kv_idx - q_idx, top-left
  aligned); `slopes` [N] default `score_mods.alibi_slopes(num_heads)` and may be
  traced (gradients reach them through U). Returns (U [1, T, N, 2], V [1, S, 1, 2]).
  """
  n = _check_int('num_heads', num_heads)
  if slopes is None:
    slopes = jnp.asarray(score_mods.alibi_slopes(n), jnp.float32)
  slopes = _check_vector('slopes', slopes, n)
  return linear_bias_factors(-slopes, slopes, q_len, kv_len)


def _randomized_svd(a: jax.Array, rank: int, oversample: int, power_iters: int,
                    key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rank-`rank` SVD of a [..., M, S] by a randomized range finder (Halko et al.).

  "Finding Structure with Randomness" (Halko, Martinsson, Tropp, SIAM Review 2011),
  Algorithms 4.4 + 5.1: Y = A Omega (Gaussian, rank + oversample columns), subspace
  iterations with re-orthonormalisation, then the SVD of the small Q^T A.
  O(M S (R + p)) per pass instead of the full SVD's O(M S min(M, S)).
  """
  *lead, _, s = a.shape
  width = min(rank + oversample, min(a.shape[-2:]))
  omega = jax.random.normal(key, (*lead, s, width), a.dtype)
  hi = jax.lax.Precision.HIGHEST
  q, _ = jnp.linalg.qr(jnp.matmul(a, omega, precision=hi))  # [..., M, W]
  at = jnp.swapaxes(a, -1, -2)
  for _ in range(power_iters):
    z, _ = jnp.linalg.qr(jnp.matmul(at, q, precision=hi))  # [..., S, W]
    q, _ = jnp.linalg.qr(jnp.matmul(a, z, precision=hi))  # [..., M, W]
  small = jnp.matmul(jnp.swapaxes(q, -1, -2), a, precision=hi)  # [..., W, S]
  ub, sigma, wt = jnp.linalg.svd(small, full_matrices=False)
  return jnp.matmul(q, ub, precision=hi), sigma, wt


def svd_bias_factors(bias: jax.Array, rank: int, *, num_kv_heads: int | None = None,
                     method: str = 'exact', oversample: int = 8,
                     power_iters: int = 2, key: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Truncated-SVD factors of a general bias and their relative Frobenius error.

  For each batch entry and kv head k, the biases of the G = N / K query heads that
  share k are stacked to a [G T, S] matrix; its best rank-R approximation (Eckart-
  Young) A ~= (P diag(sigma))_R W_R^T gives U = P diag(sigma) per query head and the
  shared key factor V = W (so the factors also fit GQA). K = N: per-head SVD.

  Args:
    bias: [N, T, S] or [B, N, T, S] floating.
    rank: R in [1, min(G T, S)] (G = N / K; min(T, S) without GQA).
    num_kv_heads: K, a divisor of N (default N).
    method: 'exact' (`jnp.linalg.svd`) or 'randomized' (Halko et al.'s range finder
      with `oversample` extra columns and `power_iters` subspace iterations, from
      `key`, default PRNGKey(0); for long sequences, where the full SVD is O(T^3)).
    oversample, power_iters, key: the randomized method's settings.

  Returns:
    (U [B', T, N, R], V [B', S, K, R], rel_error) with B' = B (1 for a rank-3 bias)
    and rel_error = ||bias - U V^T||_F / ||bias||_F (0 for a zero bias), a scalar.
    It understates the attention error where the bias has a cusp: softmax reacts
    to absolute logit errors near each row's maximum (measured, T = 2048 causal,
    -m_n ||p_i - p_j|| on a 32 x 64 grid, rank 16: bias error 1.2e-2, output error
    0.34; the rank-4 squared distance: 3e-7 and 7e-6).
  """
  _checks.check_array('bias', bias, floating=True)
  if bias.ndim not in (3, 4):
    raise ValueError(f'bias must have shape [N, T, S] or [B, N, T, S], got '
                     f'{tuple(bias.shape)}.')
  b4 = bias if bias.ndim == 4 else bias[None]
  bb, n, t, s = b4.shape
  kh = n if num_kv_heads is None else _check_int('num_kv_heads', num_kv_heads)
  if n % kh:
    raise ValueError(f'num_kv_heads must divide the bias heads ({n}), got {kh}.')
  g = n // kh
  rank = _check_int('rank', rank)
  if rank > min(g * t, s):
    raise ValueError(f'rank must be in [1, min(G T, S)] = [1, {min(g * t, s)}] '
                     f'(G = N / K = {g}, T = {t}, S = {s}), got {rank}.')
  if method not in ('exact', 'randomized'):
    raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}.")
  oversample = _check_int('oversample', oversample, 0)
  power_iters = _check_int('power_iters', power_iters, 0)
  stacked = b4.reshape(bb, kh, g * t, s)  # [B, K, G T, S] (heads n = k G + g)
  if method == 'exact':
    p, sigma, wt = jnp.linalg.svd(stacked, full_matrices=False)
  else:
    p, sigma, wt = _randomized_svd(
        stacked, rank, oversample, power_iters,
        jax.random.PRNGKey(0) if key is None else key)
  u = p[..., :rank] * sigma[..., None, :rank]  # [B, K, G T, R]
  w = jnp.swapaxes(wt[..., :rank, :], -1, -2)  # [B, K, S, R]
  u = u.reshape(bb, kh, g, t, rank).reshape(bb, n, t, rank)  # [B, N, T, R]
  u, v = jnp.swapaxes(u, 1, 2), jnp.swapaxes(w, 1, 2)  # [B, T, N, R], [B, S, K, R]
  resid = b4 - bias_from_factors(u, v)  # [B, N, T, S]
  norm = jnp.sqrt(jnp.sum(jnp.square(b4)))
  err = jnp.sqrt(jnp.sum(jnp.square(resid)))
  rel = jnp.where(norm > 0, err / jnp.where(norm > 0, norm, 1), 0.0)
  return u, v, rel


def bias_from_factors(u: jax.Array, v: jax.Array) -> jax.Array:
  """The dense bias [B', N, T, S] = U V^T (query head n uses V's head n // (N / K)).

  u [B or 1, T, N, R], v [B or 1, S, K or 1, R]; B' = max of their batches.
  """
  _check_factors(u, v, None, None)
  n, kh = u.shape[2], v.shape[2]
  bb = max(u.shape[0], v.shape[0])
  v_full = jnp.repeat(v, n // kh, axis=2)  # [B or 1, S, N, R]
  u = jnp.broadcast_to(u, (bb,) + u.shape[1:])
  v_full = jnp.broadcast_to(v_full, (bb,) + v_full.shape[1:])
  return jnp.einsum('btnr,bsnr->bnts', u, v_full,
                    precision=jax.lax.Precision.HIGHEST)  # [B', N, T, S]


def _check_factors(u: Any, v: Any, query: Any, key: Any) -> None:
  _checks.check_array('u', u, ndim=4, floating=True)
  _checks.check_array('v', v, ndim=4, floating=True)
  if u.shape[3] != v.shape[3] or u.shape[3] < 1:
    raise ValueError(f'u and v must share their rank (dim 3) >= 1, got u '
                     f'{tuple(u.shape)} and v {tuple(v.shape)}.')
  if u.shape[0] != v.shape[0] and 1 not in (u.shape[0], v.shape[0]):
    raise ValueError(f'u and v batch (dim 0) must match or be 1, got {u.shape[0]} '
                     f'and {v.shape[0]}.')
  if u.shape[2] % v.shape[2]:
    raise ValueError(f'v heads (dim 2) must divide u heads ({u.shape[2]}), got '
                     f'{v.shape[2]}.')
  if query is None:
    return
  b, t, n, _ = query.shape
  _, s, kh, _ = key.shape
  if tuple(u.shape[:3]) not in ((b, t, n), (1, t, n)):
    raise ValueError(f'u must have shape [B or 1, T, N, R] = [{b} or 1, {t}, {n}, R], '
                     f'got {tuple(u.shape)}.')
  if tuple(v.shape[:3]) not in ((b, s, kh), (1, s, kh), (b, s, 1), (1, s, 1)):
    raise ValueError(f'v must have shape [B or 1, S, K or 1, R] = [{b} or 1, {s}, '
                     f'{kh} or 1, R] (one key factor per kv head: the query heads '
                     f'of a group share it), got {tuple(v.shape)}.')


def augment_qk(query: jax.Array, key: jax.Array, u: jax.Array, v: jax.Array, *,
               scale: float | None = None
              ) -> tuple[jax.Array, jax.Array, float]:
  """(q' [B, T, N, H + R], k' [B, S, K, H + R], 1.0): q'.k' = scale q.k + U.V.

  The scale goes on q (q' = [scale q, U]) and the returned logits scale is 1: the
  factors stay exact (ALiBi's are integers times the slopes), only q is rounded.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H].
    u: [B or 1, T, N, R] query factor (per query head).
    v: [B or 1, S, K or 1, R] key factor (per kv head: shared by its query group).
    scale: the logits scale of q.k (default 1 / sqrt(H), as the unaugmented call).

  The factors are cast to the inputs' dtype; pass the returned scale (1.0) on.
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  _check_factors(u, v, query, key)
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  _checks.check_positive('scale', scale)
  b, t, n, _ = query.shape
  _, s, kh, _ = key.shape
  r = u.shape[3]
  u = jnp.broadcast_to(u, (b, t, n, r)).astype(query.dtype)
  v = jnp.broadcast_to(v, (b, s, kh, r)).astype(key.dtype)
  q_scaled = (query * jnp.asarray(scale, query.dtype)).astype(query.dtype)
  q_aug = jnp.concatenate([q_scaled, u], axis=-1)  # [B, T, N, H + R]
  k_aug = jnp.concatenate([key, v], axis=-1)  # [B, S, K, H + R]
  return q_aug, k_aug, 1.0


def flash_bias_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                         u: jax.Array, v: jax.Array, *, scale: float | None = None,
                         **kwargs) -> Any:
  """softmax(scale q k^T + U V^T) v through augmented heads (FlashBias, exact).

  Args:
    query, key, value: [B, T, N, H], [B, S, K, H], [B, S, K, H_v].
    u, v: the bias factors (see `augment_qk`); e.g. from `alibi_factors` or
      `svd_bias_factors`.
    scale: the q.k scale (default 1 / sqrt(H), not of H + R).
    **kwargs: any other argument of `attention.dot_product_attention` (mask,
      is_causal, sinks, segment_ids, bias, score_mod, return_residuals,
      implementation, ...). A score_mod sees the biased score scale q.k + U V^T
      (the dense path's order is score_mod then bias); `logits_soft_cap` is refused:
      it would cap the bias too.

  Returns:
    what `attention.dot_product_attention` returns ([B, T, N, H_v] [, lse]).
  """
  if kwargs.get('logits_soft_cap') is not None:
    raise ValueError('logits_soft_cap must be None for flash_bias_attention (the cap '
                     'would apply to q.k + bias, not to q.k alone), got '
                     f'{kwargs["logits_soft_cap"]!r}.')
  q_aug, k_aug, scale = augment_qk(query, key, u, v, scale=scale)
  return attention_api.dot_product_attention(q_aug, k_aug, value, scale=scale,
                                             **kwargs)


def alibi_flash_bias_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                               slopes: jax.Array | None = None,
                               scale: float | None = None, **kwargs) -> Any:
  """ALiBi m_n (j - i) through FlashBias's rank-2 augmentation (no bias array).

  Equal to `dot_product_attention(..., score_mod=score_mods.alibi(N))`; use with
  is_causal=True for ALiBi proper (the visible j <= i make m (j - i) = -m |i - j|).
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  u, v = alibi_factors(query.shape[2], query.shape[1], key.shape[1], slopes=slopes)
  return flash_bias_attention(query, key, value, u, v, scale=scale, **kwargs)


def alibi_flash_bias_variant(query: jax.Array, key: jax.Array, value: jax.Array, *,
                             mask: Any, is_causal: bool, sinks: jax.Array | None,
                             logits_soft_cap: float | None,
                             implementation: str | None
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Causal ALiBi through FlashBias (registry variant 'alibi_flashbias')."""
  if not is_causal:
    raise ValueError("attention variant 'alibi_flashbias' is causal only (the "
                     'symmetric bidirectional ALiBi -m |i - j| is not low rank); got '
                     'is_causal=False.')
  out = alibi_flash_bias_attention(
      query, key, value, mask=mask, is_causal=True, sinks=sinks,
      logits_soft_cap=logits_soft_cap, implementation=implementation)
  return out, {}
