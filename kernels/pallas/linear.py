"""Chunked Pallas kernel for decayed linear attention (forward and backward).

Computes, per (batch, head), S_t = exp(g_t) S_{t-1} + k_t^T v_t and o_t = q_t S_t
with one scalar log-decay per step and head: linear attention (g = 0), lightning
attention and retention (constant g = -s_h / log gamma_h) and gated linear attention
with per-head gates (Yang et al. 2024; the chunk algorithm of Lightning Attention-2,
Qin et al. 2024). One program per (batch, head) walks the chunks with a
`lax.fori_loop`, keeping the [K, V] state in registers / VMEM:

    forward, chunk i:  A = (Q_i K_i^T) * D,  D_ts = exp(G_t - G_s) [t >= s]
                       O_i = A V_i + (Q_i * exp(G)) S
                       S <- exp(G_C) S + (K_i * exp(G_C - G))^T V_i

with G the cumulative log-decay inside the chunk (computed outside the kernel, so the
kernel only sees exponents <= 0). The forward stores the state entering every chunk;
the backward walks the chunks in reverse carrying dS and returns dq, dk, dv, dS_0 and
dG (dG_t = q_t . dq_t - k_t . dk_t, plus the chunk-end terms of G_C); XLA turns dG into
the gradient of the per-step log-decays (the transpose of the cumulative sum). A
`custom_vjp` ties them together.

Shape constraints (checked by `unsupported` / `BlockSizes`):
* GPU (Triton): chunk_size a power of two >= 16 (tl.dot); head dims are zero-padded to
  a power of two >= 16 outside the kernel (exact: zero columns add nothing).
* TPU (Mosaic): chunk_size a multiple of 128 (the [C, C] tile and the lane-major row
  of log-decays); whole-sequence [T, K] / [T, V] blocks per (batch, head) must fit
  VMEM (T * (2K + 2V) * 4 bytes, plus the stored chunk states), so long sequences
  need the XLA form on TPU until a chunk-grid version exists.
* Interpret mode (CPU): chunk_size a multiple of 8; any head dims.
No segment ids and no per-key-dimension gates here: those fall back to the chunked
XLA form (`attention.linear`'s dispatch asks `unsupported`). Verified only in
interpret mode on CPU (forward and gradients against the naive quadratic form,
tests/kernels/test_pallas_linear.py); compiled behaviour needs hardware.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import _arrays

BACKENDS = ('tpu', 'gpu')
DEFAULT_CHUNK = {'tpu': 128, 'gpu': 64}


@dataclasses.dataclass(frozen=True)
class Config:
  backend: str
  chunk_size: int
  interpret: bool


def check_chunk_size(backend: str, chunk_size: int, interpret: bool) -> None:
  """Raises ValueError if `chunk_size` breaks the backend's tiling rules."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or \
      chunk_size <= 0:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size!r}.')
  if interpret:
    if chunk_size % 8:
      raise ValueError(
          f'chunk_size must be a multiple of 8 (interpret mode), got {chunk_size}.')
  elif backend == 'tpu' and chunk_size % 128:
    raise ValueError(
        f'chunk_size must be a multiple of 128 on TPU (Mosaic), got {chunk_size}.')
  elif backend == 'gpu' and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
    raise ValueError(
        f'chunk_size must be a power of two >= 16 on GPU (tl.dot), got '
        f'{chunk_size}.')


def _dot(a, b, acc):
  return jnp.dot(a, b, preferred_element_type=acc).astype(acc)


def _chunk(c: int, i, q_ref, k_ref, v_ref, gc_ref, gr_ref, acc):
  start = pl.multiple_of(i * c, c)
  q = q_ref[pl.ds(start, c), :].astype(acc)  # [C, K]
  k = k_ref[pl.ds(start, c), :].astype(acc)  # [C, K]
  v = v_ref[pl.ds(start, c), :].astype(acc)  # [C, V]
  gcol = gc_ref[pl.ds(start, c), :].astype(acc)  # [C, 1]
  grow = gr_ref[:, pl.ds(start, c)].astype(acc)  # [1, C]
  glast = gcol[c - 1:c, :]  # [1, 1]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  causal = rows >= cols
  d = jnp.where(causal, jnp.exp(jnp.where(causal, gcol - grow, 0.0)), 0.0)
  return start, q, k, v, gcol, glast, d, rows


def _fwd_kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, s0_ref, o_ref, st_ref,
                states_ref, *, c: int, nc: int, acc):
  def body(i, s):
    start, q, k, v, gcol, glast, d, _ = _chunk(c, i, q_ref, k_ref, v_ref,
                                               gc_ref, gr_ref, acc)
    states_ref[pl.ds(i, 1), :, :] = s[None].astype(states_ref.dtype)
    a = _dot(q, k.T, acc) * d  # [C, C]
    o = _dot(a, v, acc) + _dot(q * jnp.exp(gcol), s, acc)  # [C, V]
    o_ref[pl.ds(start, c), :] = o.astype(o_ref.dtype)
    return jnp.exp(glast) * s + _dot((k * jnp.exp(glast - gcol)).T, v, acc)

  s = lax.fori_loop(0, nc, body, s0_ref[...].astype(acc))
  st_ref[...] = s.astype(st_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, gc_ref, gr_ref, states_ref, do_ref,
                dst_ref, dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, *, c: int,
                nc: int, acc):
  def body(j, ds):
    i = nc - 1 - j
    start, q, k, v, gcol, glast, d, rows = _chunk(c, i, q_ref, k_ref, v_ref,
                                                  gc_ref, gr_ref, acc)
    s = states_ref[pl.ds(i, 1), :, :][0].astype(acc)  # [K, V] entering state
    do = do_ref[pl.ds(start, c), :].astype(acc)  # [C, V]
    a = _dot(q, k.T, acc) * d  # [C, C]
    da = _dot(do, v.T, acc) * d  # [C, C]
    eq = jnp.exp(gcol)  # [C, 1]
    ek = jnp.exp(glast - gcol)  # [C, 1]
    dq = _dot(da, k, acc) + eq * _dot(do, s.T, acc)  # [C, K]
    dk_state = ek * _dot(v, ds.T, acc)  # [C, K]
    dk = _dot(da.T, q, acc) + dk_state  # [C, K]
    dv = _dot(a.T, do, acc) + _dot(k * ek, ds, acc)  # [C, V]
    dg = (jnp.sum(q * dq, axis=1, keepdims=True) -
          jnp.sum(k * dk, axis=1, keepdims=True))  # [C, 1]
    end = (jnp.sum(k * dk_state) + jnp.sum(ds * s) * jnp.exp(glast[0, 0]))
    dg = dg + jnp.where(rows[:, :1] == c - 1, end, 0.0)
    dq_ref[pl.ds(start, c), :] = dq.astype(dq_ref.dtype)
    dk_ref[pl.ds(start, c), :] = dk.astype(dk_ref.dtype)
    dv_ref[pl.ds(start, c), :] = dv.astype(dv_ref.dtype)
    dg_ref[pl.ds(start, c), :] = dg.astype(dg_ref.dtype)
    return jnp.exp(glast) * ds + _dot((q * eq).T, do, acc)

  ds = lax.fori_loop(0, nc, body, dst_ref[...].astype(acc))
  ds0_ref[...] = ds.astype(ds0_ref.dtype)


def _spec(*block):
  """Block of one (batch, head) program: leading two dims squeezed."""
  return pl.BlockSpec((None, None) + block, lambda b, n: (b, n) + (0,) * len(block))


def _params(cfg: Config):
  if cfg.interpret:
    return {}
  if cfg.backend == 'gpu':
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    return dict(compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return dict(compiler_params=pltpu.CompilerParams(
      dimension_semantics=('parallel', 'parallel')))


def _acc(dtype):
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _forward(cfg: Config, q, k, v, gcum, s0):
  b, n, t, hk = q.shape
  hv = v.shape[-1]
  c, nc = cfg.chunk_size, t // cfg.chunk_size
  acc = _acc(q.dtype)
  gc, gr = gcum[..., None], gcum[:, :, None, :]
  kernel = functools.partial(_fwd_kernel, c=c, nc=nc, acc=acc)
  return pl.pallas_call(
      kernel, grid=(b, n),
      in_specs=[_spec(t, hk), _spec(t, hk), _spec(t, hv), _spec(t, 1),
                _spec(1, t), _spec(hk, hv)],
      out_specs=[_spec(t, hv), _spec(hk, hv), _spec(nc, hk, hv)],
      out_shape=[jax.ShapeDtypeStruct((b, n, t, hv), q.dtype),
                 jax.ShapeDtypeStruct((b, n, hk, hv), acc),
                 jax.ShapeDtypeStruct((b, n, nc, hk, hv), acc)],
      interpret=cfg.interpret, **_params(cfg))(q, k, v, gc, gr, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: Config, q, k, v, gcum, s0):
  o, final, _ = _forward(cfg, q, k, v, gcum, s0)
  return o, final


def _core_fwd(cfg, q, k, v, gcum, s0):
  o, final, states = _forward(cfg, q, k, v, gcum, s0)
  return (o, final), (q, k, v, gcum, states)


def _core_bwd(cfg, res, cts):
  q, k, v, gcum, states = res
  do, dst = cts
  b, n, t, hk = q.shape
  hv = v.shape[-1]
  c, nc = cfg.chunk_size, t // cfg.chunk_size
  acc = _acc(q.dtype)
  kernel = functools.partial(_bwd_kernel, c=c, nc=nc, acc=acc)
  dq, dk, dv, dg, ds0 = pl.pallas_call(
      kernel, grid=(b, n),
      in_specs=[_spec(t, hk), _spec(t, hk), _spec(t, hv), _spec(t, 1),
                _spec(1, t), _spec(nc, hk, hv), _spec(t, hv), _spec(hk, hv)],
      out_specs=[_spec(t, hk), _spec(t, hk), _spec(t, hv), _spec(t, 1),
                 _spec(hk, hv)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, n, t, 1), acc),
                 jax.ShapeDtypeStruct((b, n, hk, hv), acc)],
      interpret=cfg.interpret, **_params(cfg))(
          q, k, v, gcum[..., None], gcum[:, :, None, :], states, do,
          dst.astype(acc))
  return dq, dk, dv, dg[..., 0].astype(gcum.dtype), ds0


_core.defvjp(_core_fwd, _core_bwd)


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def unsupported(log_decay, segment_ids) -> str | None:
  """Why the kernel cannot run these inputs (None if it can)."""
  if segment_ids is not None:
    return 'segment_ids (packed sequences) are handled by the XLA chunked form'
  if log_decay is not None and log_decay.ndim == 4:
    return ('per-key-dimension gates are handled by the XLA chunked form (the '
            'kernel takes one decay per step and head)')
  return None


def chunked(q: jax.Array, k: jax.Array, v: jax.Array,
            log_decay: jax.Array | None, initial_state: jax.Array | None, *,
            backend: str, chunk_size: int | None = None,
            interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Causal decayed linear attention by the Pallas chunk kernel.

  Args:
    q: [B, T, N, K], already scaled.
    k: [B, T, N, K] (heads already repeated to N).
    v: [B, T, N, V].
    log_decay: None or [B, T, N] per-step log-decays <= 0.
    initial_state: None or [B, N, K, V].
    backend: 'tpu' or 'gpu' (the lowering; with interpret=True both run on CPU).
    chunk_size: tokens per chunk (default 128 on TPU, 64 on GPU); T is padded.
    interpret: run the kernel in the Pallas interpreter (default: on CPU).

  Returns:
    (out [B, T, N, V] in q's dtype, final state [B, N, K, V] float32 / float64).
  """
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}.')
  reason = unsupported(log_decay, None)
  if reason:
    raise ValueError(f'pallas linear kernel: {reason}.')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  chunk_size = DEFAULT_CHUNK[backend] if chunk_size is None else chunk_size
  check_chunk_size(backend, chunk_size, bool(interpret))
  cfg = Config(backend, chunk_size, bool(interpret))
  b, t, n, hk = q.shape
  hv = v.shape[-1]
  acc = _acc(q.dtype)
  tp = -(-t // chunk_size) * chunk_size
  kp, vp = (_pow2(hk), _pow2(hv)) if backend == 'gpu' else (hk, hv)
  heads_first = lambda a, width: _arrays.pad_axis(_arrays.pad_axis(
      jnp.moveaxis(a, 2, 1), 2, tp), 3, width)  # [B, N, T', width]
  qh, kh, vh = heads_first(q, kp), heads_first(k, kp), heads_first(v, vp)
  if log_decay is None:
    gcum = jnp.zeros((b, n, tp), acc)
  else:
    g = _arrays.pad_axis(jnp.moveaxis(log_decay.astype(acc), 2, 1), 2, tp)
    gcum = jnp.cumsum(g.reshape(b, n, tp // chunk_size, chunk_size),
                      axis=-1).reshape(b, n, tp)  # within-chunk cumulative
  s0 = (jnp.zeros((b, n, hk, hv), acc) if initial_state is None else
        initial_state.astype(acc))
  s0 = _arrays.pad_axis(_arrays.pad_axis(s0, 2, kp), 3, vp)
  o, final = _core(cfg, qh, kh, vh, gcum, s0)
  out = jnp.moveaxis(o[:, :, :t, :hv], 1, 2)  # [B, T, N, V]
  return out, final[:, :, :hk, :hv]
