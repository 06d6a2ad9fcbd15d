"""LightNet: an additive linear recurrence that scans multi-dimensional data once.

"You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet"
(Qin, Mao, Shen, Li, Sun, Zhong; 2024, arXiv:2405.21022). A multiplicative
recurrence S_t = lambda_t S_{t-1} + k_t^T v_t depends on the scan order, so an image
needs several scans (one per direction) for a global receptive field. LightNet uses the
additive recurrence

    S_t = S_{t-1} + exp(k_t)^T v_t,    delta_t = delta_{t-1} + exp(k_t),
    o_t = q_t (S_t / delta_t)          (division per key dimension),

i.e. per key dimension the keys are softmax-normalised over the positions seen so far:
o_t = sum_{s<=t} sum_d q_td exp(k_sd - z_td) v_s with z_t = logcumsumexp_{s<=t} k_s.
Non-causally (images, bidirectional LM) the normaliser runs over all tokens, and the
state after one scan over the flattened grid, in any order, is the whole sum: one scan
handles any number of dimensions. Written as a decayed recurrence on the normalised
state, S'_t = exp(z_{t-1} - z_t) S'_{t-1} + exp(k_t - z_t)^T v_t, a data-dependent
decay per key dimension, so the chunked form is GLA's (`attention.linear.gla`).
The paper's layer: q = SiLU(x W_q), k = x W_k (no activation), v = x W_v, an output
gate sigmoid(x W_g1 W_g2), a norm and the output projection (`LightNetAttention`).

Positional encodings for a token grid of m axes:

* MD-LRPE (`md_lrpe`): the linearised relative positional encoding (cosFormer-style
  [x cos theta, x sin theta], doubling the feature width) with the key features split
  into m groups, group i rotated by the token's coordinate on axis i:
  theta_{t, n, i K/m + f} = p_i(t) omega_{n, f}, omega = base^{-2 j / (N K)} over the
  N K features. Then phi(q_t) . phi(k_s) = sum_d q_td k_sd cos(theta_td - theta_sd),
  a function of the coordinate differences only. Applied to q and to the normalised
  keys exp(k - z) (the decay of each feature is repeated for its cos / sin copies).
* MD-TPE (`md_tpe`, `MDTPE`): a Toeplitz positional encoding per axis: along each
  axis, per head, a decayed (lambda_h^{|i - j|}, or causal lambda_h^{i - j}, i >= j)
  mixing of the tokens on the same line, scaled per head, summed over axes.

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, d model dim, r gate rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention import _checks
from attention.linear import _grid
from attention.linear import gla


def grid_coordinates(grid: Sequence[int], offset: int = 0) -> np.ndarray:
  """[prod(grid), m] row-major coordinates of each token (axis 0 shifted by offset)."""
  coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing='ij'),
                    -1).reshape(-1, len(grid))
  coords[:, 0] += offset
  return coords


def lrpe_angles(grid: Sequence[int], num_heads: int, head_dim: int, *,
                base: float = 10000.0, offset: int = 0) -> np.ndarray:
  """[T, N, K] MD-LRPE angles theta_{t, n, i K/m + f} = p_i(t) omega_{n, f}."""
  m = len(grid)
  if head_dim % m:
    raise ValueError(f'head_dim ({head_dim}) must be divisible by the number of '
                     f'grid axes ({m}) for MD-LRPE.')
  omega = base ** (-2.0 / (num_heads * head_dim) *
                   np.arange(num_heads * head_dim)).reshape(num_heads, head_dim)
  per = head_dim // m
  coords = grid_coordinates(grid, offset)  # [T, m]
  return np.concatenate([coords[:, i, None, None] * omega[None, :, :per]
                         for i in range(m)], axis=-1)  # [T, N, K]


def md_lrpe(x: jax.Array, grid: Sequence[int], *, base: float = 10000.0,
            offset: int = 0) -> jax.Array:
  """[B, T, N, K] -> [B, T, N, 2K] = [x cos theta, x sin theta] (MD-LRPE).

  `grid` is the token grid of T (e.g. (H, W), or (T,) for text); `offset` shifts the
  first axis (decoding a 1D sequence from position `offset`).
  """
  _checks.check_array('x', x, ndim=4, floating=True)
  _checks.check_positive('base', base, allow_none=False)
  b, t, n, k = x.shape
  grid = _grid.check_grid(grid, t)
  theta = jnp.asarray(lrpe_angles(grid, n, k, base=base, offset=offset),
                      _grid.compute_dtype(x))  # [T, N, K]
  xx = x.astype(theta.dtype)
  return jnp.concatenate([xx * jnp.cos(theta), xx * jnp.sin(theta)],
                         -1).astype(x.dtype)


def _prepare(query, key, value, causal, lrpe_grid, base, offset):
  _grid.check_bool('causal', causal)
  q, k, v, out_dtype = _grid.check_qkv(query, key, value)
  theta = None
  if lrpe_grid is not None:
    t, n, hk = q.shape[1:]
    grid = _grid.check_grid(lrpe_grid, t, 'lrpe_grid')
    theta = jnp.asarray(lrpe_angles(grid, n, hk, base=base, offset=offset),
                        q.dtype)  # [T, N, K]
  return q, k, v, theta, out_dtype


def _rot(x, theta):  # [B, T, N, K] -> [B, T, N, 2K]
  return jnp.concatenate([x * jnp.cos(theta), x * jnp.sin(theta)], -1)


def naive_lightnet_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             *, causal: bool = True,
                             lrpe_grid: Sequence[int] | None = None,
                             base: float = 10000.0) -> jax.Array:
  """The quadratic form (oracle): o_t = sum_s sum_d q_td exp(k_sd - z_td)
  [cos(theta_td - theta_sd)] v_s, z the (prefix) log-sum-exp of k over s.

  Args:
    query: [B, T, N, K] (activated: the layer applies SiLU).
    key: [B, T, N_kv, K] (log-weights; softmax-normalised over positions).
    value: [B, T, N_kv, V].
    causal: prefix normaliser over s <= t, else over all tokens.
    lrpe_grid: the token grid for MD-LRPE, or None for none.
    base: MD-LRPE frequency base.

  Returns:
    out [B, T, N, V].
  """
  q, k, v, theta, out_dtype = _prepare(query, key, value, causal, lrpe_grid,
                                       base, 0)
  b, t, n, hk = q.shape
  z = lax.cumlogsumexp(k, axis=1) if causal else jnp.broadcast_to(
      jax.nn.logsumexp(k, axis=1, keepdims=True), k.shape)  # [B, T, N, K]
  logw = k[:, None] - z[:, :, None]  # [B, T, S, N, K]
  if causal:
    vis = jnp.tril(jnp.ones((t, t), bool))[None, :, :, None, None]
    logw = jnp.where(vis, logw, -jnp.inf)
  w = jnp.exp(logw)
  if theta is not None:
    w = w * jnp.cos(theta[:, None] - theta[None, :])  # [T, S, N, K]
  return jnp.einsum('btnk,btsnk,bsnv->btnv', q, w, v).astype(out_dtype)


def _causal_inputs(q, k, theta, initial_lse):
  """Normalised keys, per-key log-decays and the final log-normaliser."""
  z = lax.cumlogsumexp(k, axis=1)  # [B, T, N, K]
  if initial_lse is not None:
    z = jnp.logaddexp(z, initial_lse[:, None].astype(z.dtype))
    prev = jnp.concatenate([initial_lse[:, None].astype(z.dtype), z[:, :-1]], 1)
  else:  # The first step decays a zero state: any finite log-decay (0) will do.
    prev = jnp.concatenate([z[:, :1], z[:, :-1]], 1)
  kn, g = jnp.exp(k - z), prev - z  # [B, T, N, K] each; g <= 0
  if theta is not None:
    q, kn, g = _rot(q, theta), _rot(kn, theta), jnp.concatenate([g, g], -1)
  return q, kn, g, z[:, -1]


def _check_state(initial_state, b, n, kw, hk, hv):
  if initial_state is None:
    return None, None
  if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
    raise ValueError('initial_state must be a (state [B, N, K\', V], log_normaliser '
                     '[B, N, K]) pair as returned by the causal forms.')
  s0, lse0 = initial_state
  if tuple(s0.shape) != (b, n, kw, hv) or tuple(lse0.shape) != (b, n, hk):
    raise ValueError(
        f'initial_state must have shapes {(b, n, kw, hv)} and {(b, n, hk)}, got '
        f'{tuple(s0.shape)} and {tuple(lse0.shape)}.')
  return s0, lse0


def recurrent_lightnet_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    lrpe_grid: Sequence[int] | None = None, base: float = 10000.0,
    lrpe_offset: int = 0, initial_state=None):
  """The causal additive recurrence as a `lax.scan` (decoding).

  Args as `naive_lightnet_attention` (causal), plus `lrpe_offset` (first position of
  a 1D continuation) and `initial_state` = (S [B, N, K', V], z [B, N, K]) with K' = 2K
  under MD-LRPE: the normalised state and the log-normaliser of the keys so far.

  Returns:
    (out [B, T, N, V], (S, z) after the last token).
  """
  q, k, v, theta, out_dtype = _prepare(query, key, value, True, lrpe_grid, base,
                                       lrpe_offset)
  b, t, n, hk = q.shape
  kw = 2 * hk if theta is not None else hk
  s0, z0 = _check_state(initial_state, b, n, kw, hk, v.shape[-1])
  s0 = jnp.zeros((b, n, kw, v.shape[-1]), q.dtype) if s0 is None else s0.astype(
      q.dtype)
  z0 = jnp.full((b, n, hk), -jnp.inf, q.dtype) if z0 is None else z0.astype(
      q.dtype)
  th = jnp.zeros((t, n, hk), q.dtype) if theta is None else theta

  def step(carry, inp):
    s, z = carry  # [B, N, K', V], [B, N, K]
    qt, kt, vt, tht = inp  # [B, N, K], [B, N, K], [B, N, V], [N, K]
    z_new = jnp.logaddexp(z, kt)
    decay = jnp.exp(z - z_new)  # [B, N, K] (0 on the first step)
    kn = jnp.exp(kt - z_new)
    if theta is not None:
      qt = jnp.concatenate([qt * jnp.cos(tht), qt * jnp.sin(tht)], -1)
      kn = jnp.concatenate([kn * jnp.cos(tht), kn * jnp.sin(tht)], -1)
      decay = jnp.concatenate([decay, decay], -1)
    s = decay[..., None] * s + jnp.einsum('bnk,bnv->bnkv', kn, vt)
    return (s, z_new), jnp.einsum('bnk,bnkv->bnv', qt, s)  # [B, N, V]

  (s, z), out = lax.scan(step, (s0, z0), (jnp.moveaxis(q, 1, 0),
                                           jnp.moveaxis(k, 1, 0),
                                           jnp.moveaxis(v, 1, 0), th))
  return jnp.moveaxis(out, 0, 1).astype(out_dtype), (s, z)


def lightnet_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                       causal: bool = True,
                       lrpe_grid: Sequence[int] | None = None,
                       base: float = 10000.0, lrpe_offset: int = 0,
                       initial_state=None, chunk_size: int = 16):
  """LightNet attention, the fast form.

  Non-causal: one pass, o = q (softmax_s(k)^T v) (with MD-LRPE on q and on the
  normalised keys). Causal: the chunked form (GLA's chunk algorithm on the
  normalised keys with per-key log-decays z_{t-1} - z_t).

  Arguments as `recurrent_lightnet_attention` (plus `causal`, `chunk_size`).

  Returns:
    (out [B, T, N, V], final state (S, z) or None when non-causal).
  """
  q, k, v, theta, out_dtype = _prepare(query, key, value, causal, lrpe_grid,
                                       base, lrpe_offset)
  b, t, n, hk = q.shape
  if not causal:
    if initial_state is not None:
      raise ValueError('initial_state requires causal=True.')
    kn = jax.nn.softmax(k, axis=1)  # [B, T, N, K] normalised over all tokens
    if theta is not None:
      q, kn = _rot(q, theta), _rot(kn, theta)
    kv = jnp.einsum('bsnk,bsnv->bnkv', kn, v)  # [B, N, K', V]
    return jnp.einsum('btnk,bnkv->btnv', q, kv).astype(out_dtype), None
  kw = 2 * hk if theta is not None else hk
  s0, z0 = _check_state(initial_state, b, n, kw, hk, v.shape[-1])
  qq, kn, g, z_last = _causal_inputs(q, k, theta, z0)
  out, s = gla.chunked_gated_linear_attention(
      qq, kn, v, g, scale=1.0, chunk_size=chunk_size,
      initial_state=None if s0 is None else s0.astype(q.dtype))
  return out.astype(out_dtype), (s, z_last)


def md_tpe(x: jax.Array, grid: Sequence[int], log_decay: jax.Array,
           gain: jax.Array, *, causal: bool = False) -> jax.Array:
  """MD-TPE: per-axis Toeplitz mixing of the tokens on each grid line, summed.

  Args:
    x: [B, T, N, H] tokens on the row-major `grid`.
    grid: the token grid (m axes).
    log_decay: [m, N] per-axis, per-head log lambda <= 0.
    gain: [m, N] per-axis, per-head scale.
    causal: lambda^{i - j} for j <= i on each axis, else lambda^{|i - j|}.

  Returns:
    [B, T, N, H]: y_t = sum_a gain[a, n] sum_{s on t's axis-a line} lambda_{a, n}^
    {dist_a(t, s)} x_s.
  """
  _checks.check_array('x', x, ndim=4, floating=True)
  b, t, n, h = x.shape
  grid = _grid.check_grid(grid, t)
  m = len(grid)
  for name, arr in (('log_decay', log_decay), ('gain', gain)):
    _checks.check_array(name, arr, floating=True)
    if tuple(arr.shape) != (m, n):
      raise ValueError(f'{name} must have shape {(m, n)} [axes, N], got '
                       f'{tuple(arr.shape)}.')
  if _grid_is_concrete(log_decay) and np.any(np.asarray(log_decay) > 0):
    raise ValueError('log_decay must be <= 0 (lambda = exp(log_decay) in (0, 1]).')
  dtype = _grid.compute_dtype(x, log_decay, gain)
  xg = x.astype(dtype).reshape(b, *grid, n, h)
  out = 0.0
  letters = 'abcdefg'[:m]
  for a, size in enumerate(grid):
    i = np.arange(size)
    dist = i[:, None] - i[None, :]  # [G, G]
    vis = dist >= 0 if causal else np.ones_like(dist, bool)
    mat = jnp.where(vis, jnp.exp(log_decay[a].astype(dtype)[:, None, None] *
                                 np.abs(dist)), 0.0)  # [N, G, G]
    mat = mat * gain[a].astype(dtype)[:, None, None]
    src = letters.replace(letters[a], 'z')
    out = out + jnp.einsum(f'n{letters[a]}z,x{src}nh->x{letters}nh', mat, xg)
  return out.reshape(b, t, n, h).astype(x.dtype)


def _grid_is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _param(rngs, shape, fan_in, axes):
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) /
                   math.sqrt(fan_in), logical_axes=axes)


class LightNetAttention(nnx.Module):
  """LightNet token mixer (Qin et al. 2024): q = SiLU(x W_q), k = x W_k, v = x W_v,
  the additive recurrence (MD-LRPE on the grid when `lrpe`), an output gate
  sigmoid(x W_g1 W_g2) (rank `gate_rank`), RMSNorm, output projection.

  `grid`: the token grid for MD-LRPE (None: a 1D sequence of the input's length).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               causal: bool = True, grid: Sequence[int] | None = None,
               lrpe: bool = True, gate_rank: int = 16, base: float = 10000.0,
               rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim), ('gate_rank', gate_rank)):
      if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f'{name} must be a positive int, got {val!r}.')
    self.causal = _grid.check_bool('causal', causal)
    self.lrpe = _grid.check_bool('lrpe', lrpe)
    self.grid = None if grid is None else _grid.check_dims('grid', grid)
    if lrpe and head_dim % (1 if grid is None else len(self.grid)):
      raise ValueError(f'head_dim ({head_dim}) must be divisible by the number of '
                       f'grid axes ({len(self.grid)}) for MD-LRPE.')
    self.base = base
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))
    self.w_gate1 = _param(rngs, (dim, gate_rank), dim, ('embed', None))
    self.w_gate2 = _param(rngs, (gate_rank, num_heads, head_dim), gate_rank,
                          (None, 'heads', 'head_dim'))
    self.norm_scale = nnx.Param(jnp.ones((num_heads, head_dim), jnp.float32),
                                logical_axes=('heads', 'head_dim'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = jax.nn.silu(proj(self.wq)), proj(self.wk), proj(self.wv)
    grid = None
    if self.lrpe:
      grid = (x.shape[1],) if self.grid is None else _grid.check_grid(
          self.grid, x.shape[1])
    o, _ = lightnet_attention(q, k, v, causal=self.causal, lrpe_grid=grid,
                              base=self.base)  # [B, T, N, H]
    gate = jax.nn.sigmoid(jnp.einsum(
        'btr,rnh->btnh', jnp.einsum('btd,dr->btr', x, self.w_gate1[...].astype(
            dt)), self.w_gate2[...].astype(dt)))  # [B, T, N, H]
    o = o * gate
    o32 = o.astype(jnp.promote_types(o.dtype, jnp.float32))
    o32 = o32 * lax.rsqrt(jnp.mean(o32 * o32, axis=(-2, -1), keepdims=True) +
                          1e-6) * self.norm_scale[...]
    return jnp.einsum('btnh,nhd->btd', o32.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]


class MDTPE(nnx.Module):
  """MD-TPE positional mixer (LightNet): x + W_o md_tpe(x split into heads)."""

  def __init__(self, dim: int, num_heads: int, grid: Sequence[int], *,
               causal: bool = False, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads}).')
    self.grid = _grid.check_dims('grid', grid)
    self.causal = _grid.check_bool('causal', causal)
    self.num_heads = num_heads
    m = len(self.grid)
    self.decay_logit = nnx.Param(
        jax.random.normal(rngs.params(), (m, num_heads), jnp.float32),
        logical_axes=(None, 'heads'))
    self.gain = nnx.Param(jnp.ones((m, num_heads), jnp.float32) / m,
                          logical_axes=(None, 'heads'))
    self.wo = _param(rngs, (dim, dim), dim, ('embed', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    b, t, d = x.shape
    xh = x.reshape(b, t, self.num_heads, d // self.num_heads)
    y = md_tpe(xh, self.grid, jax.nn.log_sigmoid(self.decay_logit[...]),
               self.gain[...], causal=self.causal).reshape(b, t, d)
    return x + jnp.einsum('btd,de->bte', y, self.wo[...].astype(x.dtype))
