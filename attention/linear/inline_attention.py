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

State (`InLineState`): the sufficient statistics of those prefix sums, sum_j phi(K_j)
V_j^T [B, N, K, V], sum_j phi(K_j) [B, N, K], sum_j V_j [B, N, V] and the count of
keys seen [B]. The causal forms take it as `initial_state` (its keys count towards
N_i) and return the state after the last token (`return_state=True`;
`recurrent_inline_attention`, a `lax.scan` for decoding, always does), so chunked
prefill followed by token-by-token decoding reproduces the full causal output.
`segment_ids` [B, T] pack variable-length sequences: wherever the id changes the state
restarts from zero (the initial state belongs to the first segment).

Local term (the paper's second ingredient, for 2D token grids): a 3x3 depthwise
convolution of V whose per-sample, per-channel kernels come from an MLP of the mean
input token, added to O (`inline_local_term`, `InLineAttention`).

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, d model dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

from attention.linear import _grid
from attention.linear import _prefix
from attention.linear import layers
from attention.linear import linear_transformer

FeatureMap = linear_transformer.FeatureMap


class InLineState(NamedTuple):
  """Sufficient statistics of the causal InLine prefix sums (in the compute dtype)."""
  kv: jax.Array  # [B, N, K, V] sum_j phi(K_j) V_j^T
  k_sum: jax.Array  # [B, N, K] sum_j phi(K_j)
  v_sum: jax.Array  # [B, N, V] sum_j V_j
  count: jax.Array  # [B] keys seen (a float)


def _features(query, key, value, feature_map, causal, scale, initial_state=None,
              segment_ids=None, return_state=False):
  _grid.check_bool('causal', causal)
  _grid.check_bool('return_state', return_state)
  q, k, v, out_dtype = _grid.check_qkv(query, key, value)
  phi = linear_transformer.feature_map_fn(feature_map)
  fq, fk = phi(q), phi(k)
  if fq.shape != q.shape or fk.shape != k.shape:
    raise ValueError(f'feature_map must preserve shapes, got {tuple(fq.shape)} from '
                     f'query {tuple(q.shape)}.')
  b, t, n, hk = fq.shape
  hv = v.shape[-1]
  s0 = _prefix.check_state(
      initial_state, InLineState,
      dict(kv=(b, n, hk, hv), k_sum=(b, n, hk), v_sum=(b, n, hv), count=(b,)),
      fq.dtype, causal)
  reset = _prefix.check_segments(segment_ids, b, t, causal)
  return fq, fk, v, _grid.check_scale(scale, q.shape[-1]), out_dtype, s0, reset


def _combine(fq, kv_q, k_sum, v_sum, count, c):
  """O = (c/N) phi(Q) . KV + (1 - c phi(Q) . ksum / N) vsum / N, count N [B, T]."""
  m = count[:, :, None]  # [B, T, 1]
  resid = 1.0 - c * jnp.einsum('btnk,btnk->btn', fq, k_sum) / m  # [B, T, N]
  return kv_q * (c / m)[..., None] + (resid / m)[..., None] * v_sum


def naive_inline_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                           causal: bool = False,
                           feature_map: FeatureMap = 'identity',
                           scale: float | None = None,
                           initial_state: InLineState | None = None,
                           segment_ids: jax.Array | None = None,
                           return_state: bool = False) -> Any:
  """The quadratic form: explicit weights InL(Q_i)_j times V (the oracle).

  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K].
    value: [B, T, N_kv, V].
    causal: restrict key j to j <= i (the means then run over j <= i).
    feature_map: phi, a name in FEATURE_MAPS or a callable (default identity).
    scale: c, default K ** -0.5.
    initial_state: an `InLineState` of earlier keys (causal only): row i of the
      first segment weighs them as N_0 more keys summarised by their sums.
    segment_ids: [B, T] ints (causal only); keys of other segments are invisible.
    return_state: also return the state after the last token (None if non-causal).

  Returns:
    out [B, T, N, V], or (out, final InLineState | None) with return_state.
  """
  fq, fk, v, c, out_dtype, s0, reset = _features(
      query, key, value, feature_map, causal, scale, initial_state, segment_ids,
      return_state)
  b, t = fq.shape[:2]
  s = jnp.einsum('btnk,bsnk->bnts', fq, fk)  # [B, N, T, S]
  if causal:
    vis = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    runs = (jnp.zeros((b, t), jnp.int32) if reset is None else
            _prefix.runs_from_resets(reset))
    vis = vis & (runs[:, :, None] == runs[:, None, :])  # [B, T, S]
    first = (runs == 0).astype(fq.dtype)  # [B, T] rows that see the initial state
    count = jnp.sum(vis, axis=-1).astype(fq.dtype)  # [B, T] keys seen
  else:
    vis = jnp.ones((b, t, t), bool)
    count = jnp.full((b, t), t, fq.dtype)
  vis = vis[:, None]  # [B, 1, T, S]
  s = jnp.where(vis, s, 0.0)
  total = jnp.sum(s, axis=-1)  # [B, N, T]
  if causal and s0 is not None:
    count = count + first * s0.count[:, None]
    total = total + jnp.moveaxis(first[:, :, None] * jnp.einsum(
        'btnk,bnk->btn', fq, s0.k_sum), 1, 2)
  cnt = count[:, None, :, None]  # [B, 1, T, 1]
  mean = total[..., None] / cnt  # [B, N, T, 1]
  w = jnp.where(vis, c / cnt * (s - mean) + 1.0 / cnt, 0.0)  # [B, N, T, S]
  out = jnp.einsum('bnts,bsnv->btnv', w, v)  # [B, T, N, V]
  if not causal:
    return (out.astype(out_dtype), None) if return_state else out.astype(out_dtype)
  if s0 is not None:  # The initial state's keys, summarised by their sums.
    cm = jnp.moveaxis(cnt, 1, 2)  # [B, T, 1, 1]
    mean_t = jnp.moveaxis(mean, 1, 2)  # [B, T, N, 1]
    state_term = (c / cm * jnp.einsum('btnk,bnkv->btnv', fq, s0.kv) +
                  (1.0 / cm - c / cm * mean_t) * s0.v_sum[:, None])
    out = out + first[:, :, None, None] * state_term
  out = out.astype(out_dtype)
  if not return_state:
    return out
  last = (runs == runs[:, -1:]).astype(fq.dtype)  # [B, T] tokens of the last run
  final = InLineState(
      jnp.einsum('bt,btnk,btnv->bnkv', last, fk, v), jnp.einsum(
          'bt,btnk->bnk', last, fk), jnp.einsum('bt,btnv->bnv', last, v),
      jnp.sum(last, axis=1))
  if s0 is not None:
    keep = (runs[:, -1] == 0).astype(fq.dtype)  # [B] the last run is the first
    final = InLineState(*(f + keep.reshape((b,) + (1,) * (f.ndim - 1)) * i
                          for f, i in zip(final, s0)))
  return out, final


def inline_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     causal: bool = False, feature_map: FeatureMap = 'identity',
                     scale: float | None = None, chunk_size: int = 64,
                     initial_state: InLineState | None = None,
                     segment_ids: jax.Array | None = None,
                     return_state: bool = False) -> Any:
  """The linear-time form (global sums; prefix sums when causal).

  Arguments as `naive_inline_attention`; `chunk_size` is the chunk of the causal
  prefix product (`attention.linear.chunked_linear_attention`); the other prefix sums
  are (segmented) cumulative sums. Returns out [B, T, N, V], or (out, final state)
  with `return_state`.
  """
  fq, fk, v, c, out_dtype, s0, reset = _features(
      query, key, value, feature_map, causal, scale, initial_state, segment_ids,
      return_state)
  t = fq.shape[1]
  if not causal:
    kv = jnp.einsum('bsnk,bsnv->bnkv', fk, v)  # [B, N, K, V]
    kbar = jnp.mean(fk, axis=1)  # [B, N, K]
    vbar = jnp.mean(v, axis=1)  # [B, N, V]
    main = jnp.einsum('btnk,bnkv->btnv', fq, kv) * (c / t)  # [B, T, N, V]
    resid = 1.0 - c * jnp.einsum('btnk,bnk->btn', fq, kbar)  # [B, T, N]
    out = (main + resid[..., None] * vbar[:, None]).astype(out_dtype)
    return (out, None) if return_state else out
  init = (lambda name: None) if s0 is None else (lambda name: getattr(s0, name))
  qkv, kv_final = linear_transformer.chunked_linear_attention(  # [B, T, N, V]
      fq, fk, v, feature_map='identity', normalize=False, causal=True,
      scale=1.0, chunk_size=chunk_size, initial_state=init('kv'),
      segment_ids=None if reset is None else _prefix.runs_from_resets(reset))
  count = _prefix.segment_scan(jnp.ones(fq.shape[:2], fq.dtype), reset,
                               init('count'))  # [B, T]
  k_sum = _prefix.segment_scan(fk, reset, init('k_sum'))  # [B, T, N, K]
  v_sum = _prefix.segment_scan(v, reset, init('v_sum'))  # [B, T, N, V]
  out = _combine(fq, qkv, k_sum, v_sum, count, c).astype(out_dtype)
  if not return_state:
    return out
  return out, InLineState(kv_final, k_sum[:, -1], v_sum[:, -1], count[:, -1])


def recurrent_inline_attention(query: jax.Array, key: jax.Array,
                               value: jax.Array, *,
                               feature_map: FeatureMap = 'identity',
                               scale: float | None = None,
                               initial_state: InLineState | None = None,
                               segment_ids: jax.Array | None = None
                              ) -> tuple[jax.Array, InLineState]:
  """The causal form as a `lax.scan` over tokens (decoding, one token at a time).

  Arguments as `naive_inline_attention` (causal). Returns (out [B, T, N, V], the
  `InLineState` after the last token).
  """
  fq, fk, v, c, out_dtype, s0, reset = _features(
      query, key, value, feature_map, True, scale, initial_state, segment_ids)
  b, t, n, hk = fq.shape
  hv = v.shape[-1]
  if s0 is None:
    s0 = InLineState(jnp.zeros((b, n, hk, hv), fq.dtype),
                     jnp.zeros((b, n, hk), fq.dtype),
                     jnp.zeros((b, n, hv), fq.dtype), jnp.zeros((b,), fq.dtype))
  if reset is None:
    reset = jnp.zeros((b, t), bool)

  def step(state, inp):
    qt, kt, vt, rt = inp  # [B, N, K], [B, N, K], [B, N, V], [B]
    state = InLineState(*(jnp.where(rt.reshape((b,) + (1,) * (a.ndim - 1)), 0.0,
                                    a) for a in state))
    kv = state.kv + jnp.einsum('bnk,bnv->bnkv', kt, vt)  # [B, N, K, V]
    state = InLineState(kv, state.k_sum + kt, state.v_sum + vt, state.count + 1.0)
    m = state.count[:, None]  # [B, 1]
    resid = 1.0 - c * jnp.einsum('bnk,bnk->bn', qt, state.k_sum) / m  # [B, N]
    o = (jnp.einsum('bnk,bnkv->bnv', qt, kv) * (c / m)[..., None] +
         (resid / m)[..., None] * state.v_sum)  # [B, N, V]
    return state, o

  tm = lambda a: jnp.moveaxis(a, 1, 0)
  final, out = lax.scan(step, s0, (tm(fq), tm(fk), tm(v), tm(reset)))
  return jnp.moveaxis(out, 0, 1).astype(out_dtype), final


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


class InLineAttention(layers._Projected):  # pylint: disable=protected-access
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
    super().__init__(dim, num_heads, head_dim, rngs=rngs)  # wq, wk, wv, wo
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
    if local:
      taps = self.kernel_size ** len(self.grid)
      self.w_local1 = layers._param(  # pylint: disable=protected-access
          rngs, (dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
      self.w_local2 = layers._param(  # pylint: disable=protected-access
          rngs, (num_heads, head_dim, taps * head_dim), head_dim * taps,
          ('heads', 'head_dim', None))

  def __call__(self, x: jax.Array, *, initial_state: InLineState | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int = 64, return_state: bool = False) -> Any:
    """x [B, T, D] -> [B, T, D] (and the final `InLineState` with return_state).

    As the layers of `attention.linear.layers`: `mode` 'chunked' (training,
    prefill) or 'recurrent' (decoding; causal only); `initial_state`, `segment_ids`
    need causal=True.
    """
    self._check_mode(mode)
    if mode == 'recurrent' and not self.causal:
      raise ValueError("mode='recurrent' requires causal=True.")
    dt = x.dtype
    q, k, v = self._qkv(x)  # [B, T, N, H]
    kw = dict(feature_map=self.feature_map, initial_state=initial_state,
              segment_ids=segment_ids)
    if mode == 'recurrent':
      o, state = recurrent_inline_attention(q, k, v, **kw)  # [B, T, N, H]
    else:
      o, state = inline_attention(q, k, v, causal=self.causal,
                                  chunk_size=chunk_size, return_state=True,
                                  **kw)  # [B, T, N, H]
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
    return self._ret(self._out(o, dt), state, return_state)  # [B, T, D]
