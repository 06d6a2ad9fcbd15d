"""HyperAttention: long-context attention in near-linear time (Han et al., 2023).

"HyperAttention: Long-context Attention in Near-Linear Time" (Han, Jayaram, Karbasi,
Mirrokni, Woodruff, Zandieh; ICLR 2024), following the authors' reference code
(github.com/insuhan/hyper-attn, `hyper_attn.py`, `angular_lsh.py`, `utils.py`).

Non-causal (T queries, S keys), per (batch, head):

1. sortLSH. Angular LSH with r random Gaussian directions W [H, r] shared by every
   head (as the reference code): the sign pattern of x W is a bucket; buckets are
   ordered by their rank in the reflected binary Gray code, so adjacent buckets differ
   in one bit (the paper's "Hamming sorted" LSH). q and k are stably sorted by their
   bucket rank. The reference code indexes the Gray sequence by the bucket id (the
   inverse map, whose neighbours can differ in several bits); this file uses the rank
   so that the sort is Hamming ordered as the paper defines it.
2. Block diagonal. With nb = ceil(S / b) key blocks and query blocks of
   bq = ceil(T / nb), the i-th block of sorted queries attends exactly to the i-th
   block of sorted keys (padding keys masked; the reference code pads with zero keys,
   which enter its softmax denominator).
3. Sampled residual. m key positions (of the sorted order) are drawn uniformly with
   replacement, per (batch, head); every sorted query attends to them with the
   samples that fall in its own block MASKED (they are already counted exactly in
   step 2: this is the reference code's `block_mask`), and the log-sum-exp is
   reweighted by log(S / m). The masked estimator is unbiased for the off-diagonal
   mass: E[(S / m) sum_i 1[j_i not in block] e^{s_{j_i}}]
   = sum_{j not in block} e^{s_j}.
4. Merge. out = (e^{lse_1} out_1 + e^{lse_2} out_2) / (e^{lse_1} + e^{lse_2}),
   lse = log(e^{lse_1} + e^{lse_2}) (`merge_attention`), then the rows are unsorted.

Below the length threshold (T <= min_seq_len) the result is exact attention. No
sampling happens when one block holds every key (nb == 1): that is exact too.

Causal (the paper's Algorithm 4, recursive halving; the reference `forward`):
exact causal attention when T <= min_seq_len; otherwise (T padded by one zero token
when odd, which only the padded query can see) the two diagonal quadrants recurse as
one batch of 2B half-length causal problems, the lower-left quadrant (second-half
queries vs first-half keys) is the non-causal HyperAttention above, and the lower
half's two parts are merged by log-sum-exp.

Randomness is explicit: `key` gives the LSH directions (fold_in(key, 0), shared by
every recursion level, as the reference module holds one AngularLSH) and the samples
(fold_in(key, 1) split down the recursion; the batched diagonal quadrants draw
independent samples per batch row). GQA: key/value heads are repeated to the query
heads first (the sort is per query head).

Einsum letters: b batch, t/s positions, n heads, h head dim, r projections.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int >= {minimum}, got '
                    f'{type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def _check_key(key: Any) -> jax.Array:
  if not isinstance(key, jax.Array):
    raise TypeError(f'key must be a jax.random key array, got {type(key).__name__}.')
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != (2,) or key.dtype != jnp.uint32:
      raise ValueError('key must be a jax.random.key (or a legacy uint32[2] '
                       f'PRNGKey), got dtype {key.dtype} shape {key.shape}.')
  return key


def _check_qkv(query, key, value):
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, h = query.shape
  if key.shape[0] != b or key.shape[3] != h:
    raise ValueError(f'key must have shape [B, S, K, H] = [{b}, S, K, {h}], got '
                     f'{list(key.shape)}.')
  kh = key.shape[2]
  if kh < 1 or n % kh:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads ({kh}).')
  if value.shape[:3] != key.shape[:3]:
    raise ValueError(f'value must have shape [B, S, K, H_v] with [B, S, K] = '
                     f'{list(key.shape[:3])}, got {list(value.shape)}.')


# ----------------------------------------------------------------------- sortLSH --


def lsh_projections(key: jax.Array, head_dim: int, num_projs: int) -> jax.Array:
  """The r random Gaussian directions W [H, r] of the angular LSH (float32)."""
  _check_key(key)
  head_dim = _check_int('head_dim', head_dim, 1)
  num_projs = _check_int('num_projs', num_projs, 1)
  if num_projs > 30:
    raise ValueError(f'num_projs must be <= 30 (int32 bucket ids), got {num_projs}.')
  return jax.random.normal(key, (head_dim, num_projs), jnp.float32)


def gray_rank(code: jax.Array, num_bits: int) -> jax.Array:
  """The position of each bit pattern in the reflected binary Gray code sequence.

  The inverse Gray map (prefix XOR from the most significant bit): consecutive ranks
  r, r + 1 are the codes g(r) = r ^ (r >> 1), g(r + 1), which differ in one bit.
  """
  rank = code
  shift = 1
  while shift < num_bits:
    rank = jnp.bitwise_xor(rank, jnp.right_shift(rank, shift))
    shift *= 2
  return rank


def sort_lsh_buckets(x: jax.Array, projections: jax.Array) -> jax.Array:
  """int32 [B, T, N]: the Hamming-ordered bucket rank of each token (sortLSH).

  bucket = sum_i [x . W_i > 0] 2^i, ranked by `gray_rank`.
  """
  _checks.check_array('x', x, ndim=4, floating=True)
  _checks.check_array('projections', projections, ndim=2, floating=True)
  if projections.shape[0] != x.shape[-1]:
    raise ValueError(f'projections must have shape [H, r] with H = {x.shape[-1]}, '
                     f'got {list(projections.shape)}.')
  r = projections.shape[1]
  proj = jnp.einsum('btnh,hr->btnr', x.astype(jnp.float32),
                    projections.astype(jnp.float32))  # [B, T, N, r]
  bits = (proj > 0).astype(jnp.int32)
  code = jnp.sum(bits * (2 ** jnp.arange(r, dtype=jnp.int32)), axis=-1)
  return gray_rank(code, r)


def sort_lsh_permutation(x: jax.Array, projections: jax.Array) -> jax.Array:
  """int32 [B, N, T]: the stable sort of the positions by bucket rank, per head."""
  buckets = jnp.swapaxes(sort_lsh_buckets(x, projections), 1, 2)  # [B, N, T]
  return jnp.argsort(buckets, axis=-1, stable=True).astype(jnp.int32)


# ------------------------------------------------------------------------- merge --


def merge_attention(out1: jax.Array, lse1: jax.Array, out2: jax.Array,
                    lse2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two softmax attentions over disjoint key sets as one (log-sum-exp merge).

  out_i [B, T, N, H_v], lse_i [B, N, T] (-inf: the part saw no key). Returns
  (out in out1's dtype, lse in at least float32; float64 inputs merge in float64);
  rows where both lse are -inf give zeros and -inf, never NaN (the reference code's
  `add_self_attentions`).
  """
  for name, o, l in (('out1', out1, lse1), ('out2', out2, lse2)):
    if o.ndim != 4 or l.shape != (o.shape[0], o.shape[2], o.shape[1]):
      raise ValueError(f'{name} [B, T, N, H] must come with lse [B, N, T]; got '
                       f'{list(o.shape)} and {list(l.shape)}.')
  if out1.shape != out2.shape:
    raise ValueError(f'out2 must have the shape of out1 {list(out1.shape)}, got '
                     f'{list(out2.shape)}.')
  cdt = jnp.promote_types(jnp.result_type(out1, out2, lse1, lse2), jnp.float32)
  l1, l2 = lse1.astype(cdt), lse2.astype(cdt)
  m = jnp.maximum(l1, l2)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e1, e2 = jnp.exp(l1 - m), jnp.exp(l2 - m)  # [B, N, T]
  total = e1 + e2
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
  w1 = jnp.swapaxes(e1 / safe, 1, 2)[..., None]  # [B, T, N, 1]
  w2 = jnp.swapaxes(e2 / safe, 1, 2)[..., None]
  out = w1 * out1.astype(cdt) + w2 * out2.astype(cdt)
  return out.astype(out1.dtype), lse


# --------------------------------------------------------------- the algorithm --


def _exact(q, k, v, *, causal, scale, implementation):
  return api.dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                   return_residuals=True,
                                   implementation=implementation)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, T, H] gathered along T by idx [B, N, M] -> [B, N, M, H]."""
  return jnp.take_along_axis(x, idx[..., None], axis=2)


def _pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _non_causal(q, k, v, *, projections, sample_key, block_size, sample_size,
                min_seq_len, scale, implementation):
  """Non-causal HyperAttention; q [B, T, N, H], k / v [B, S, N, .] (heads equal)."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  if t <= min_seq_len:
    return _exact(q, k, v, causal=False, scale=scale, implementation=implementation)
  hv = v.shape[-1]
  q_perm = sort_lsh_permutation(q, projections)  # [B, N, T]
  k_perm = sort_lsh_permutation(k, projections)  # [B, N, S]
  qs = _take(jnp.swapaxes(q, 1, 2), q_perm)  # [B, N, T, H] sorted rows
  ks = _take(jnp.swapaxes(k, 1, 2), k_perm)  # [B, N, S, H]
  vs = _take(jnp.swapaxes(v, 1, 2), k_perm)  # [B, N, S, H_v]

  # 2. Exact attention on the block diagonal of the permuted matrix.
  nb = -(-s // block_size)
  bq = -(-t // nb)
  qb = _pad_axis(qs, 2, nb * bq).reshape(b * n * nb, bq, 1, -1)  # [BNn, bq, 1, H]
  kb = _pad_axis(ks, 2, nb * block_size).reshape(b * n * nb, block_size, 1, -1)
  vb = _pad_axis(vs, 2, nb * block_size).reshape(b * n * nb, block_size, 1, hv)
  mask = None
  if nb * block_size != s:
    real = (np.arange(nb * block_size) < s).reshape(nb, 1, 1, block_size)
    mask = jnp.asarray(np.tile(real, (b * n, 1, 1, 1)))  # [BNn, 1, 1, b]
  out_blk, lse_blk = api.dot_product_attention(
      qb, kb, vb, mask=mask, scale=scale, return_residuals=True,
      implementation=implementation)  # [BNn, bq, 1, H_v], [BNn, 1, bq]
  out_blk = out_blk.reshape(b, n, nb * bq, hv)[:, :, :t]  # [B, N, T, H_v]
  lse_blk = lse_blk.reshape(b, n, nb * bq)[:, :, :t]  # [B, N, T]
  out_blk = jnp.swapaxes(out_blk, 1, 2)  # [B, T, N, H_v] (sorted rows)

  # 3. Uniformly sampled residual, the block-diagonal keys masked.
  if sample_size > 0 and nb > 1:
    idx = jax.random.randint(sample_key, (b, n, sample_size), 0, s,
                             dtype=jnp.int32)  # [B, N, m]
    k_sub = jnp.swapaxes(_take(ks, idx), 1, 2)  # [B, m, N, H]
    v_sub = jnp.swapaxes(_take(vs, idx), 1, 2)  # [B, m, N, H_v]
    q_block = jnp.arange(t) // bq  # [T]
    visible = q_block[None, None, :, None] != (idx // block_size)[:, :, None, :]
    out_res, lse_res = api.dot_product_attention(
        jnp.swapaxes(qs, 1, 2), k_sub, v_sub, mask=visible, scale=scale,
        return_residuals=True, implementation=implementation)  # [B, T, N, H_v]
    lse_res = lse_res + np.log(s / sample_size)
    out, lse = merge_attention(out_blk, lse_blk, out_res, lse_res)
  else:
    out, lse = out_blk, lse_blk

  # 4. Rows back to the input order.
  inv = jnp.argsort(q_perm, axis=-1)  # [B, N, T]
  lse = jnp.take_along_axis(lse, inv, axis=-1)
  out = jnp.swapaxes(_take(jnp.swapaxes(out, 1, 2), inv), 1, 2)  # [B, T, N, H_v]
  return out, lse


def _causal(q, k, v, *, projections, sample_key, block_size, sample_size,
            min_seq_len, scale, implementation):
  """Causal HyperAttention by recursive halving (q, k, v of equal length T)."""
  b, t, n, _ = q.shape
  if t <= min_seq_len:
    return _exact(q, k, v, causal=True, scale=scale, implementation=implementation)
  even = t + (t % 2)
  q, k, v = (_pad_axis(x, 1, even) for x in (q, k, v))  # a zero token at the end
  half = even // 2
  fold = lambda x: x.reshape((b * 2, half) + x.shape[2:])  # [2B, T/2, N, .]
  key_diag, key_off = jax.random.split(sample_key)
  opts = dict(projections=projections, block_size=block_size,
              sample_size=sample_size, min_seq_len=min_seq_len, scale=scale,
              implementation=implementation)
  out_d, lse_d = _causal(fold(q), fold(k), fold(v), sample_key=key_diag, **opts)
  out_d = out_d.reshape((b, even) + out_d.shape[2:])  # [B, T, N, H_v]
  lse_d = jnp.swapaxes(lse_d.reshape(b, 2, n, half), 1, 2).reshape(b, n, even)
  out_o, lse_o = _non_causal(q[:, half:], k[:, :half], v[:, :half],
                             sample_key=key_off, **opts)
  out_lo, lse_lo = merge_attention(out_d[:, half:], lse_d[..., half:], out_o, lse_o)
  out = jnp.concatenate([out_d[:, :half], out_lo], axis=1)[:, :t]
  lse = jnp.concatenate([lse_d[..., :half], lse_lo], axis=-1)[..., :t]
  return out, lse


def hyper_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    rng: jax.Array, is_causal: bool = False, block_size: int = 256,
                    sample_size: int = 256, min_seq_len: int = 4096,
                    num_projs: int = 7, scale: float | None = None,
                    return_residuals: bool = False,
                    implementation: str | None = None) -> Any:
  """HyperAttention (Han et al., 2023): sortLSH block diagonal + sampled residual.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, H_v] (N a multiple of
      K). Causal needs S == T (self-attention).
    rng: a `jax.random.key`: the LSH directions and the samples (module docstring).
    is_causal: recursive halving (exact below min_seq_len).
    block_size: b, keys per block of the sorted block diagonal (>= 1).
    sample_size: m, uniformly sampled keys for the residual (0: none).
    min_seq_len: exact attention when the (sub)problem has T <= min_seq_len queries.
    num_projs: r, LSH hyperplanes (2^r buckets), in [1, 30].
    scale: logits scale, default 1 / sqrt(H).
    return_residuals: also return the (estimated) log-sum-exp [B, N, T].
    implementation: the `attention.dot_product_attention` implementation of the
      exact parts.

  Returns:
    out [B, T, N, H_v] (and lse [B, N, T] float32 if `return_residuals`).
  """
  _check_qkv(query, key, value)
  _check_key(rng)
  if not isinstance(is_causal, bool):
    raise TypeError(f'is_causal must be a bool, got {type(is_causal).__name__}.')
  block_size = _check_int('block_size', block_size, 1)
  sample_size = _check_int('sample_size', sample_size, 0)
  min_seq_len = _check_int('min_seq_len', min_seq_len, 1)
  num_projs = _check_int('num_projs', num_projs, 1)
  _checks.check_positive('scale', scale)
  if is_causal and key.shape[1] != query.shape[1]:
    raise ValueError(f'key length must equal the query length ({query.shape[1]}) '
                     f'when is_causal, got {key.shape[1]}.')
  rep = query.shape[2] // key.shape[2]
  k = jnp.repeat(key, rep, axis=2) if rep > 1 else key
  v = jnp.repeat(value, rep, axis=2) if rep > 1 else value
  projections = lsh_projections(jax.random.fold_in(rng, 0), query.shape[-1],
                                num_projs)
  scale = float(scale) if scale is not None else 1.0 / np.sqrt(query.shape[-1])
  fn = _causal if is_causal else _non_causal
  out, lse = fn(query, k, v, projections=projections,
                sample_key=jax.random.fold_in(rng, 1), block_size=block_size,
                sample_size=sample_size, min_seq_len=min_seq_len, scale=scale,
                implementation=implementation)
  out = out.astype(query.dtype)
  return (out, lse) if return_residuals else out


# ------------------------------------------------------------- error reporting --


def relative_error(query: jax.Array, key: jax.Array, value: jax.Array, *,
                   rng: jax.Array, is_causal: bool = False,
                   relative_to: str = 'output', **settings) -> float:
  """The Frobenius error of HyperAttention vs exact attention on these inputs.

  relative_to 'output': ||approx - exact||_F / ||exact||_F. With mean-zero values
  and spread-out attention the exact rows average many values and are short
  (~1 / sqrt(T) of a value row), so this grows with T at a fixed budget;
  'values': ||approx - exact||_F / (sqrt(T) * RMS row norm of V), the error per row
  in units of a typical value vector (the scale of the paper's guarantee,
  ||D^-1 A||_op ||V||_op, without the dense operator norm).

  `settings`: block_size, sample_size, min_seq_len, num_projs, scale,
  implementation, as `hyper_attention`. The exact output is
  `attention.dot_product_attention` with the same implementation.
  """
  if relative_to not in ('output', 'values'):
    raise ValueError(f"relative_to must be 'output' or 'values', got "
                     f'{relative_to!r}.')
  approx = hyper_attention(query, key, value, rng=rng, is_causal=is_causal,
                           **settings)
  exact = api.dot_product_attention(
      query, key, value, is_causal=is_causal, scale=settings.get('scale'),
      implementation=settings.get('implementation'))
  diff = jnp.linalg.norm((approx - exact).astype(jnp.float32))
  if relative_to == 'output':
    ref = jnp.linalg.norm(exact.astype(jnp.float32))
  else:
    v = value.astype(jnp.float32)
    rms_row = jnp.sqrt(jnp.mean(jnp.sum(v * v, axis=-1)))
    ref = rms_row * np.sqrt(query.shape[0] * query.shape[1] * query.shape[2])
  return float(diff / jnp.maximum(ref, 1e-30))


def clustered_qkv(seed: int, *, batch: int = 1, seq_len: int = 1024,
                  num_heads: int = 1, head_dim: int = 64, num_clusters: int = 16,
                  logit_gap: float = 2.0, spread: float = 0.3,
                  dtype: Any = jnp.float32
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Synthetic q, k, v [B, T, N, H] whose attention has large entries to find.

  Every q and k token belongs to one of `num_clusters` random unit directions scaled
  so that a query's logit (1 / sqrt(H) scale) to a key of its own cluster is about
  `logit_gap` above the ~0 logits to the others; `spread` is the relative noise.
  v is standard Gaussian. The input of `error_sweep` and the benchmark.
  """
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_heads, num_clusters, head_dim))
  centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
  radius = np.sqrt(logit_gap * np.sqrt(head_dim))
  labels = rng.integers(0, num_clusters, (2, batch, seq_len, num_heads))
  heads = np.arange(num_heads)[None, None, :]
  noise = lambda: (spread * radius / np.sqrt(head_dim)) * rng.normal(
      size=(batch, seq_len, num_heads, head_dim))
  q = radius * centres[heads, labels[0]] + noise()
  k = radius * centres[heads, labels[1]] + noise()
  v = rng.normal(size=(batch, seq_len, num_heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def error_sweep(lengths, budgets, *, seeds=(0, 1, 2), is_causal: bool = False,
                num_heads: int = 1, head_dim: int = 64, num_projs: int = 7,
                min_seq_len: int = 1, implementation: str | None = None
                ) -> list[dict[str, Any]]:
  """Relative error vs exact over lengths x budgets, averaged over `seeds`.

  `budgets` is an iterable of (block_size, sample_size). Each row: seq_len,
  block_size, sample_size, is_causal, mean / max over the seeds of the error
  relative to the output (rel_error_*) and to the values (value_error_mean), see
  `relative_error` (inputs `clustered_qkv(seed)`, rng `jax.random.key(seed)`).
  """
  rows = []
  for t in lengths:
    for block_size, sample_size in budgets:
      errs, verrs = [], []
      for seed in seeds:
        q, k, v = clustered_qkv(seed, seq_len=int(t), num_heads=num_heads,
                                head_dim=head_dim)
        opts = dict(rng=jax.random.key(seed), is_causal=is_causal,
                    block_size=block_size, sample_size=sample_size,
                    min_seq_len=min_seq_len, num_projs=num_projs,
                    implementation=implementation)
        errs.append(relative_error(q, k, v, **opts))
        verrs.append(relative_error(q, k, v, relative_to='values', **opts))
      rows.append(dict(seq_len=int(t), block_size=int(block_size),
                       sample_size=int(sample_size), is_causal=is_causal,
                       rel_error_mean=float(np.mean(errs)),
                       rel_error_max=float(np.max(errs)),
                       value_error_mean=float(np.mean(verrs))))
  return rows


# -------------------------------------------------------------------- registry --


def make_registry_variant(*, block_size: int = 256, sample_size: int = 256,
                          min_seq_len: int = 4096, num_projs: int = 7,
                          seed: int = 0) -> Callable[..., Any]:
  """A registry variant `fn(q, k, v, *, mask, is_causal, sinks, logits_soft_cap,
  implementation) -> (out, {})` running HyperAttention.

  Randomness: the registry interface passes no key, so the variant uses the fixed
  key fold_in(key(seed), 0x4879) at every call: the LSH directions and the sampled
  columns are the same at every training step (a deterministic function of the
  inputs, differentiable through the kept entries like exact attention). For fresh
  samples per step call `hyper_attention(..., rng=fold_in(key, step))` directly.
  Defaults follow the reference code (b = m = 256, exact below 4096 tokens, r = 7).
  No mask, sinks or soft-cap.
  """
  opts = dict(block_size=_check_int('block_size', block_size, 1),
              sample_size=_check_int('sample_size', sample_size, 0),
              min_seq_len=_check_int('min_seq_len', min_seq_len, 1),
              num_projs=_check_int('num_projs', num_projs, 1))
  seed = _check_int('seed', seed, 0)

  def variant(query, key, value, *, mask, is_causal, sinks, logits_soft_cap,
              implementation):
    for arg, val in (('mask', mask), ('sinks', sinks),
                     ('logits_soft_cap', logits_soft_cap)):
      if val is not None:
        raise ValueError(f"attention variant 'hyper' takes no {arg} (causality "
                         f'comes from is_causal), got {val!r}.')
    rng = jax.random.fold_in(jax.random.key(seed), 0x4879)
    out = hyper_attention(query, key, value, rng=rng, is_causal=bool(is_causal),
                          implementation=implementation, **opts)
    return out, {}

  variant.__doc__ = (f'HyperAttention (Han et al., 2023), {opts} (registry '
                     'variant).')
  return variant
