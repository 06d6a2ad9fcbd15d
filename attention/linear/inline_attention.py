"""InLine attention: injective linear attention with a local term.

"Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han, Pu, Xia, Song,
Huang; NeurIPS 2024). Plain linear attention phi(Q_i)^T phi(K_j) / sum_s phi(Q_i)^T
phi(K_s) is not injective (queries differing by a scale get the same weights); InLine
replaces the division by a subtraction:

    InL(Q_i)_j = c/N [phi(Q_i)^T phi(K_j) - 1/N sum_s phi(Q_i)^T phi(K_s)] + 1/N,

weights that still sum to one over j, and computes O_i = sum_j InL(Q_i)_j V_j in
linear time as

    O_i = (c/N) phi(Q_i)^T sum_j phi(K_j) V_j^T + (1 - c phi(Q_i)^T kbar) vbar,

with kbar, vbar the means of phi(K) and V and c = d^{-1/2} (the paper's code: the
kernel phi(Q_i)^T phi(K_j) is scaled by c / N). phi defaults to the identity (the
paper's choice); any map of `attention.linear.FEATURE_MAPS` or a callable works.

Causal form (not in the paper; exact via prefix sums): position i sees N_i = i + 1 keys,
    O_i = (c/N_i) phi(Q_i)^T sum_{j<=i} phi(K_j) V_j^T + (1 - c phi(Q_i)^T kbar_i) vbar_i
with prefix means kbar_i, vbar_i, i.e. the weights above restricted to j <= i. The
prefix sum runs through the chunked linear-attention form (O(T) memory).

Local term (the paper's second ingredient, for 2D token grids): a 3x3 depthwise
convolution of V whose per-sample, per-channel kernels come from an MLP of the mean
input token, added to O (`inline_local_term`, `InLineAttention`).

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, d model dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attention.linear import _grid
from attention.linear import linear_transformer

FeatureMap = linear_transformer.FeatureMap


def _features(query, key, value, feature_map, causal, scale):
  _grid.check_bool('causal', causal)
  q, k, v, out_dtype = _grid.check_qkv(query, key, value)
  phi = linear_transformer.feature_map_fn(feature_map)
  fq, fk = phi(q), phi(k)
  if fq.shape != q.shape or fk.shape != k.shape:
    raise ValueError(f'feature_map must preserve shapes, got {tuple(fq.shape)} from '
                     f'query {tuple(q.shape)}.')
  return fq, fk, v, _grid.check_scale(scale, q.shape[-1]), out_dtype


def naive_inline_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                           causal: bool = False,
                           feature_map: FeatureMap = 'identity',
                           scale: float | None = None) -> jax.Array:
  """The quadratic form: explicit weights InL(Q_i)_j times V (the oracle).

  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K].
    value: [B, T, N_kv, V].
    causal: restrict key j to j <= i (the means then run over j <= i).
    feature_map: phi, a name in FEATURE_MAPS or a callable (default identity).
    scale: c, default K ** -0.5.

  Returns:
    out [B, T, N, V].
  """
  fq, fk, v, c, out_dtype = _features(query, key, value, feature_map, causal,
                                      scale)
  t = fq.shape[1]
  s = jnp.einsum('btnk,bsnk->bnts', fq, fk)  # [B, N, T, S]
  if causal:
    vis = jnp.tril(jnp.ones((t, t), bool))  # [T, S]
    count = jnp.arange(1, t + 1, dtype=fq.dtype)[:, None]  # [T, 1] keys seen
  else:
    vis = jnp.ones((t, t), bool)
    count = jnp.full((t, 1), t, fq.dtype)
  s = jnp.where(vis, s, 0.0)
  mean = jnp.sum(s, axis=-1, keepdims=True) / count  # [B, N, T, 1]
  w = jnp.where(vis, c / count * (s - mean) + 1.0 / count, 0.0)  # [B, N, T, S]
  return jnp.einsum('bnts,bsnv->btnv', w, v).astype(out_dtype)  # [B, T, N, V]


def inline_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     causal: bool = False, feature_map: FeatureMap = 'identity',
                     scale: float | None = None, chunk_size: int = 64
                    ) -> jax.Array:
  """The linear-time form (global sums; prefix sums when causal).

  Arguments as `naive_inline_attention`; `chunk_size` is the chunk of the causal
  prefix sum (`attention.linear.chunked_linear_attention`). Returns [B, T, N, V].
  """
  fq, fk, v, c, out_dtype = _features(query, key, value, feature_map, causal,
                                      scale)
  t = fq.shape[1]
  if not causal:
    kv = jnp.einsum('bsnk,bsnv->bnkv', fk, v)  # [B, N, K, V]
    kbar = jnp.mean(fk, axis=1)  # [B, N, K]
    vbar = jnp.mean(v, axis=1)  # [B, N, V]
    main = jnp.einsum('btnk,bnkv->btnv', fq, kv) * (c / t)  # [B, T, N, V]
    resid = 1.0 - c * jnp.einsum('btnk,bnk->btn', fq, kbar)  # [B, T, N]
    return (main + resid[..., None] * vbar[:, None]).astype(out_dtype)
  count = jnp.arange(1, t + 1, dtype=fq.dtype)[None, :, None, None]  # [1, T, 1, 1]
  qkv, _ = linear_transformer.chunked_linear_attention(  # [B, T, N, V]
      fq, fk, v, feature_map='identity', normalize=False, causal=True,
      scale=1.0, chunk_size=chunk_size)
  kbar = jnp.cumsum(fk, axis=1) / count  # [B, T, N, K]
  vbar = jnp.cumsum(v, axis=1) / count  # [B, T, N, V]
  resid = 1.0 - c * jnp.einsum('btnk,btnk->btn', fq, kbar)  # [B, T, N]
  return (qkv * (c / count) + resid[..., None] * vbar).astype(out_dtype)


def inline_local_term(value: jax.Array, kernels: jax.Array,
                      grid: Sequence[int]) -> jax.Array:
  """The local term: a depthwise conv of V with a kernel per sample and channel.

  Args:
    value: [B, T, N, V] with T tokens on the row-major `grid` (e.g. (H, W)).
    kernels: [B, *K, N, V] odd-sized kernels (3x3 in the paper), per sample.
    grid: the token grid.

  Returns:
    [B, T, N, V]: sum_o kernels[b, o, n, v] value[b, p + o - K // 2, n, v], zero
    padded at the grid border.
  """
  if not hasattr(value, 'ndim') or value.ndim != 4:
    raise ValueError(f'value must have shape [B, T, N, V], got '
                     f'{getattr(value, "shape", value)!r}.')
  b, t, n, hv = value.shape
  grid = _grid.check_grid(grid, t)
  if (not hasattr(kernels, 'shape') or kernels.ndim != len(grid) + 3 or
      kernels.shape[0] != b or kernels.shape[-2:] != (n, hv)):
    raise ValueError(
        f'kernels must have shape [B, *K, N, V] = [{b}, {", ".join("K" * len(grid))},'
        f' {n}, {hv}] ({len(grid)} kernel axes for grid {grid}), got '
        f'{tuple(getattr(kernels, "shape", ()))}.')
  for i, size in enumerate(kernels.shape[1:-2]):
    _grid.check_kernel_size(f'kernels axis {i + 1} size', size)
  dtype = _grid.compute_dtype(value, kernels)
  ks = kernels.shape[1:-2]
  out = _grid.depthwise_conv(
      value.astype(dtype).reshape(b, t, n * hv),
      kernels.astype(dtype).reshape(b, *ks, n * hv), grid, per_sample=True)
  return out.reshape(b, t, n, hv).astype(value.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
           axes: tuple[str | None, ...]) -> nnx.Param:
  std = 1.0 / math.sqrt(fan_in)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class InLineAttention(nnx.Module):
  """InLine attention layer (Han et al. 2024): projections, the injective linear
  attention and, on a 2D grid, the local term.

  The local term's kernels: r = W2 GELU(W1 mean_t x) with W1 [D, N, H] (dense) and W2
  [N, H, 9 H] per head (the paper's grouped 1x1 convs; its first layer is grouped by
  heads too, which needs D = N H), reshaped to a 3x3 kernel per channel of V.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int] | None = None, causal: bool = False,
               local: bool = True, feature_map: FeatureMap = 'identity',
               kernel_size: int = 3, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f'{name} must be a positive int, got {val!r}.')
    _grid.check_bool('causal', causal)
    _grid.check_bool('local', local)
    linear_transformer.feature_map_fn(feature_map)
    if local and causal:
      raise ValueError('local=True needs causal=False (the 3x3 conv sees future '
                       'tokens).')
    if local and grid is None:
      raise ValueError('local=True needs the token grid, e.g. grid=(14, 14).')
    self.kernel_size = _grid.check_kernel_size('kernel_size', kernel_size)
    self.grid = None if grid is None else tuple(int(g) for g in grid)
    self.causal, self.local, self.feature_map = causal, local, feature_map
    self.num_heads, self.head_dim = num_heads, head_dim
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))
    if local:
      taps = self.kernel_size ** len(self.grid)
      self.w_local1 = _param(rngs, (dim, num_heads, head_dim), dim, axes)
      self.w_local2 = _param(rngs, (num_heads, head_dim, taps * head_dim),
                             head_dim * taps, ('heads', 'head_dim', None))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)  # [B, T, N, H]
    o = inline_attention(q, k, v, causal=self.causal,
                         feature_map=self.feature_map)  # [B, T, N, H]
    if self.local:
      grid = _grid.check_grid(self.grid, x.shape[1])
      hid = jax.nn.gelu(jnp.einsum('bd,dnh->bnh', jnp.mean(x, axis=1),
                                   self.w_local1[...].astype(dt)))  # [B, N, H]
      r = jnp.einsum('bnh,nhe->bne', hid,
                     self.w_local2[...].astype(dt))  # [B, N, taps * H]
      b, n, h = r.shape[0], self.num_heads, self.head_dim
      ks = (self.kernel_size,) * len(grid)
      r = r.reshape(b, n, *ks, h)  # [B, N, *K, H]
      r = jnp.moveaxis(r, 1, -2)  # [B, *K, N, H]
      o = o + inline_local_term(v, r, grid)
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
