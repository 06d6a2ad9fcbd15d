"""Relative position attention: Music Transformer's skewing, and relative-bias layers.

"Music Transformer" (Huang et al., ICLR 2019), Section 3.4: each head learns one
embedding e_r [H] per relative distance r = j - i, and the relative logits are

    S_rel[i, j] = q_i . e_{j - i},   out = softmax((Q K^T + S_rel) / sqrt(H)) V.

Shaw et al. ("Self-Attention with Relative Position Representations", 2018) gather
e_{j - i} into a [T, T, H] tensor (O(L^2 H) memory). The skewing trick instead
multiplies Q by the ordered embeddings E_r [M, H] once (Q E_r^T [T, M], M = T causal,
distances -(T-1)..0; or M = 2T - 1 bidirectional, distances -(T-1)..T-1) and moves
every entry into place by pad (one zero column on the left), reshape and slice: the
embeddings stay O(L H) (only the [T, T] logits, which attention has anyway, are
quadratic). The skewed logits enter `attention.dot_product_attention` as an additive
bias (scale * S_rel): they depend on q, so a score_mod (which sees only the score and
indices) cannot express them; `attention.score_mods.relative_logits` is the
query-independent form (one learned scalar per distance and head).

The layers below own their projections and a relative position parameter:
`RelativeAttention` (the Music Transformer layer, registry 'relative'),
`T5BiasAttention` (T5's bucketed bias table through `score_mods.t5_relative_bias`,
registry 't5_bias') and `RelativeBias2DAttention` (Swin's 2D table through
`score_mods.relative_bias_2d`, registry 'relative_2d'). ALiBi needs no parameters:
`alibi_attention` is the registry variant 'alibi'.

Einsum letters: b batch, t query position, s key position, m relative distance
(ordered), n query head, k kv head, h head dim, d model dim.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from flax import nnx
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


def _check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {type(value).__name__}.')
  return bool(value)


def num_relative_embeddings(length: int, causal: bool) -> int:
  """M: T embeddings (distances -(T-1)..0) causal, 2T - 1 (-(T-1)..T-1) otherwise."""
  length = _check_int('length', length)
  return length if _check_bool('causal', causal) else 2 * length - 1


def skew(rel_logits: jax.Array, *, causal: bool = True) -> jax.Array:
  """Music Transformer's skewing: [..., T, M] logits by distance -> [..., T, T].

  `rel_logits[..., i, m]` holds q_i . e_r for r = m - (T - 1) (M = T causal, 2T - 1
  otherwise); the result holds q_i . e_{j - i} at [..., i, j]. Pad one zero column on
  the left, reshape [..., M + 1, T] (causal) / [..., 2T, T], drop the first row, and
  (bidirectional) reshape back to [..., T, 2T - 1] and keep the first T columns.
  Causal: entries above the diagonal (j > i, no embedding) are zero.
  """
  _checks.check_array('rel_logits', rel_logits, floating=True)
  if rel_logits.ndim < 2:
    raise ValueError(f'rel_logits must have rank >= 2 ([..., T, M]), got shape '
                     f'{tuple(rel_logits.shape)}.')
  *lead, t, m = rel_logits.shape
  want = num_relative_embeddings(t, causal)
  if m != want:
    raise ValueError(f'rel_logits last dim must be {want} (T={t}, causal={causal}), '
                     f'got {m}.')
  pad = [(0, 0)] * (len(lead) + 1) + [(1, 0)]
  padded = jnp.pad(rel_logits, pad)  # [..., T, M + 1]
  if causal:
    out = padded.reshape(*lead, t + 1, t)[..., 1:, :]  # [..., T, T]
    tril = np.tril(np.ones((t, t), bool))
    return jnp.where(tril, out, jnp.zeros((), out.dtype))
  out = padded.reshape(*lead, 2 * t, t)[..., 1:, :]  # [..., 2T - 1, T]
  return out.reshape(*lead, t, 2 * t - 1)[..., :t]  # [..., T, T]


def relative_logits_skewed(query: jax.Array, rel_embeddings: jax.Array, *,
                           causal: bool = True) -> jax.Array:
  """S_rel [B, N, T, T], S_rel[b, n, i, j] = q_{b,i,n} . e_{j - i, n}, by skewing.

  Args:
    query: [B, T, N, H].
    rel_embeddings: [M, N, H] per-head embeddings ordered by distance, M = T (causal,
      r = -(T-1)..0) or 2T - 1 (bidirectional, r = -(T-1)..T-1); see
      `relative_embeddings_for_length` to cut / clip a learned table.
    causal: the causal form (zeros above the diagonal).
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('rel_embeddings', rel_embeddings, ndim=3, floating=True)
  _, t, n, h = query.shape
  want = (num_relative_embeddings(t, causal), n, h)
  if tuple(rel_embeddings.shape) != want:
    raise ValueError(f'rel_embeddings must have shape [M, N, H] = {want} (T={t}, '
                     f'causal={causal}), got {tuple(rel_embeddings.shape)}.')
  rel = jnp.einsum('btnh,mnh->bntm', query,
                   rel_embeddings.astype(query.dtype))  # [B, N, T, M]
  return skew(rel, causal=causal)  # [B, N, T, T]


def relative_embeddings_for_length(table: jax.Array, length: int, *,
                                   causal: bool = True) -> jax.Array:
  """The [M, N, H] embeddings of a length-T sequence from a learned table.

  `table` is [D + 1, N, H] (causal: distances -D..0) or [2D + 1, N, H]
  (bidirectional: -D..D), ordered by distance. Shorter sequences use the middle /
  last rows; distances beyond D share the farthest embedding (clipped, as Shaw et
  al.). O(T N H) memory.
  """
  _checks.check_array('table', table, ndim=3, floating=True)
  t = _check_int('length', length)
  causal = _check_bool('causal', causal)
  rows = table.shape[0]
  if causal:
    d = rows - 1
    if t - 1 <= d:
      return table[rows - t:]  # [T, N, H]
    far = jnp.broadcast_to(table[:1], (t - 1 - d,) + table.shape[1:])
    return jnp.concatenate([far, table], axis=0)  # [T, N, H]
  if rows % 2 != 1:
    raise ValueError(f'table must have an odd number of rows (2D + 1, distances '
                     f'-D..D) when causal=False, got {rows}.')
  d = rows // 2
  if t - 1 <= d:
    return table[d - (t - 1):d + t]  # [2T - 1, N, H]
  extra = t - 1 - d
  left = jnp.broadcast_to(table[:1], (extra,) + table.shape[1:])
  right = jnp.broadcast_to(table[-1:], (extra,) + table.shape[1:])
  return jnp.concatenate([left, table, right], axis=0)  # [2T - 1, N, H]


def music_transformer_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                                rel_embeddings: jax.Array, *, causal: bool = True,
                                mask: Any = None, sinks: jax.Array | None = None,
                                scale: float | None = None,
                                implementation: str | None = None) -> jax.Array:
  """softmax((Q K^T + S_rel) * scale) V with skewed relative logits (Music Transformer).

  Args:
    query: [B, T, N, H]; key [B, T, K, H]; value [B, T, K, H_v] (self-attention:
      relative distances need S = T; GQA when K < N, embeddings per query head).
    rel_embeddings: [M, N, H] as in `relative_logits_skewed`.
    causal: causal attention (the paper's decoder) or bidirectional.
    mask, sinks, implementation: as in `attention.dot_product_attention`.
    scale: default 1 / sqrt(H), applied to both terms as in the paper.

  Returns:
    [B, T, N, H_v].
  """
  _checks.check_array('key', key, ndim=4, floating=True)
  _checks.check_array('query', query, ndim=4, floating=True)
  if key.shape[1] != query.shape[1]:
    raise ValueError(f'key length (dim 1) must equal query length ({query.shape[1]}) '
                     f'for relative positions, got {key.shape[1]}.')
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  _checks.check_positive('scale', scale)
  s_rel = relative_logits_skewed(query, rel_embeddings, causal=causal)  # [B,N,T,T]
  bias = (s_rel * scale).astype(jnp.promote_types(query.dtype, jnp.float32))
  return attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, bias=bias, mask=mask, is_causal=causal, sinks=sinks,
      scale=scale, implementation=implementation)


def alibi_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    mask: Any, is_causal: bool, sinks: jax.Array | None,
                    logits_soft_cap: float | None, implementation: str | None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ALiBi attention ("Train Short, Test Long", Press et al. 2022), registry 'alibi'.

  Fixed head slopes (`score_mods.alibi_slopes`); causal: m_h (j - i), otherwise the
  symmetric -m_h |i - j|. Through `score_mods.alibi` (no [T, S] bias array).
  """
  mod = score_mods.alibi(query.shape[2], symmetric=not is_causal)
  out = attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=mask, is_causal=is_causal, sinks=sinks,
      logits_soft_cap=logits_soft_cap, score_mod=mod,
      implementation=implementation)
  return out, {}


# ----------------------------------------------------------------------------------------
# NNX layers.
# ----------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
           axes: tuple[str | None, ...]) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=axes)


class _Projections(nnx.Module):
  """q / k / v / o projections (LeCun-normal), shared by the layers below."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      _check_int(name, val)
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5,
                     ('embed', 'heads', 'head_dim'))
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5,
                     ('embed', 'heads', 'head_dim'))
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5,
                     ('embed', 'heads', 'head_dim'))
    self.wo = _param(rngs, (num_heads, head_dim, dim),
                     (num_heads * head_dim) ** -0.5, ('heads', 'head_dim', 'embed'))

  def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dt))  # [B, T, N, H]
    k = jnp.einsum('btd,dnh->btnh', x, self.wk[...].astype(dt))  # [B, T, N, H]
    v = jnp.einsum('btd,dnh->btnh', x, self.wv[...].astype(dt))  # [B, T, N, H]
    return q, k, v

  def out(self, o: jax.Array, dtype: Any) -> jax.Array:
    return jnp.einsum('btnh,nhd->btd', o.astype(dtype),
                      self.wo[...].astype(dtype))  # [B, T, D]


class RelativeAttention(nnx.Module):
  """Music Transformer relative attention layer x [B, T, D] -> [B, T, D].

  Per-head relative embeddings [D_max + 1, N, H] (causal) or [2 D_max + 1, N, H],
  initialised N(0, H^-1) as in the tensor2tensor implementation; distances beyond
  `max_distance` share the farthest embedding. No RoPE (positions are relative).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, causal: bool = True,
               max_distance: int = 128, implementation: str | None = None,
               rngs: nnx.Rngs):
    self.causal = _check_bool('causal', causal)
    d = _check_int('max_distance', max_distance)
    rows = d + 1 if self.causal else 2 * d + 1
    self.proj = _Projections(dim, num_heads, head_dim, rngs=rngs)
    self.rel_embeddings = _param(rngs, (rows, num_heads, head_dim), head_dim ** -0.5,
                                 (None, 'heads', 'head_dim'))
    self.implementation = implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.proj.qkv(x)
    emb = relative_embeddings_for_length(self.rel_embeddings[...], x.shape[1],
                                         causal=self.causal)  # [M, N, H]
    o = music_transformer_attention(q, k, v, emb, causal=self.causal,
                                    implementation=self.implementation)
    return self.proj.out(o, x.dtype)


class T5BiasAttention(nnx.Module):
  """Attention with T5's bucketed relative bias (Raffel et al., JMLR 2020).

  A learnable table [num_buckets, N] (truncated N(0, 0.02^2)) read through
  `score_mods.t5_relative_bias` (unidirectional buckets when causal, as T5's decoder).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, causal: bool = True,
               num_buckets: int = 32, max_distance: int = 128,
               implementation: str | None = None, rngs: nnx.Rngs):
    self.causal = _check_bool('causal', causal)
    # Validates the bucket settings and draws the table once.
    mod = score_mods.t5_relative_bias(
        num_heads, num_buckets=num_buckets, max_distance=max_distance,
        bidirectional=not self.causal, key=rngs.params())
    self.proj = _Projections(dim, num_heads, head_dim, rngs=rngs)
    self.num_buckets, self.max_distance = int(num_buckets), int(max_distance)
    self.table = nnx.Param(mod.params, logical_axes=(None, 'heads'))
    self.implementation = implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.proj.qkv(x)
    mod = score_mods.t5_relative_bias(
        q.shape[2], num_buckets=self.num_buckets, max_distance=self.max_distance,
        bidirectional=not self.causal, table=self.table[...])
    o = attention_api.dot_product_attention(  # [B, T, N, H]
        q, k, v, score_mod=mod, is_causal=self.causal,
        implementation=self.implementation)
    return self.proj.out(o, x.dtype)


class RelativeBias2DAttention(nnx.Module):
  """Bidirectional attention over an (H, W) token grid with Swin's 2D relative bias.

  "Swin Transformer" (Liu et al., ICCV 2021): table [(2H - 1)(2W - 1), N]
  (truncated N(0, 0.02^2)) read through `score_mods.relative_bias_2d`; tokens are
  raster positions of the grid.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], implementation: str | None = None,
               rngs: nnx.Rngs):
    mod = score_mods.relative_bias_2d(tuple(grid), num_heads, key=rngs.params())
    self.proj = _Projections(dim, num_heads, head_dim, rngs=rngs)
    self.grid = (int(grid[0]), int(grid[1]))
    self.table = nnx.Param(mod.params, logical_axes=(None, 'heads'))
    self.implementation = implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3 and x.shape[1] != self.grid[0] * self.grid[1]:
      raise ValueError(f'x length (dim 1) must be the grid size {self.grid[0]} x '
                       f'{self.grid[1]} = {self.grid[0] * self.grid[1]}, got '
                       f'{x.shape[1]}.')
    q, k, v = self.proj.qkv(x)
    mod = score_mods.relative_bias_2d(self.grid, q.shape[2], table=self.table[...])
    o = attention_api.dot_product_attention(  # [B, T, N, H]
        q, k, v, score_mod=mod, implementation=self.implementation)
    return self.proj.out(o, x.dtype)
