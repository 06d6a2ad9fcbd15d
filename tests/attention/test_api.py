"""Tests of `attention.dot_product_attention` with the 'reference' implementation.

Oracles: the float64 NumPy forward/backward in tests/oracles.py (independent of JAX)
and `jax.nn.dot_product_attention` where the features overlap.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from tests import oracles

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float64: 1e-12}


def _inputs(seed, b=2, t=7, s=9, n=4, kh=2, h=8, hv=5, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype)
               for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, hv)))


def _np(x):
  return np.asarray(x).astype(np.float64)


def _check_forward(q, k, v, tol, np_mask=None, **kwargs):
  fn = jax.jit(functools.partial(attention.dot_product_attention,
                                 return_residuals=True,
                                 implementation='reference', **kwargs))
  out, lse = fn(q, k, v)
  scale = kwargs.get('scale') or q.shape[-1]**-0.5
  want, want_lse = oracles.numpy_attention(
      _np(q), _np(k), _np(v), scale=scale,
      bias=None if kwargs.get('bias') is None else _np(kwargs['bias']),
      mask=np_mask, logits_soft_cap=kwargs.get('logits_soft_cap'),
      sinks=None if kwargs.get('sinks') is None else _np(kwargs['sinks']))
  assert out.dtype == q.dtype and out.shape == want.shape
  assert lse.shape == want_lse.shape
  np.testing.assert_allclose(_np(out), want, atol=tol, rtol=tol)
  finite = np.isfinite(want_lse)
  np.testing.assert_array_equal(np.isfinite(lse), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite],
                             atol=tol, rtol=tol)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_forward_all_features(dtype):
  q, k, v = _inputs(0, dtype=dtype)
  rng = np.random.default_rng(0)
  bias = jnp.asarray(rng.normal(size=(2, 1, 7, 9)), dtype)
  arr = rng.random((1, 4, 7, 9)) < 0.7
  seg_q = jnp.asarray([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
  seg_k = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 1]])
  sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], dtype)
  causal = np.tril(np.ones((7, 9), bool))
  seg = np.asarray(seg_q)[:, None, :, None] == np.asarray(seg_k)[:, None, None, :]
  _check_forward(q, k, v, TOL[dtype], np_mask=arr & causal & seg,
                 bias=bias, mask=jnp.asarray(arr), is_causal=True,
                 logits_soft_cap=2.5, sinks=sinks, scale=0.3,
                 segment_ids=(seg_q, seg_k))


def test_matches_jax_nn():
  q, k, v = _inputs(1, h=8, hv=8)
  rng = np.random.default_rng(3)
  bias = jnp.asarray(rng.normal(size=(2, 4, 7, 9)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 1, 7, 9)) < 0.8)
  for kwargs in (dict(), dict(is_causal=True), dict(bias=bias, mask=mask),
                 dict(scale=0.7, is_causal=True, bias=bias)):
    want = jax.nn.dot_product_attention(q, k, v, **kwargs)
    got = attention.dot_product_attention(q, k, v, implementation='reference',
                                          **kwargs)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_mask_object_equals_dense_mask():
  q, k, v = _inputs(2, t=9, s=9)
  obj = masks.causal(9, 9, offset=-2) | ~masks.causal(9, 9, offset=3)
  dense = obj.materialize()
  a = attention.dot_product_attention(q, k, v, mask=obj,
                                      implementation='reference')
  b = attention.dot_product_attention(q, k, v, mask=jnp.asarray(dense)[None, None],
                                      implementation='reference')
  np.testing.assert_array_equal(a, b)
  per_head = masks.from_array(np.random.default_rng(1).random((4, 9, 9)) < .5)
  _check_forward(q, k, v, TOL[jnp.float32],
                 np_mask=per_head.materialize()[None], mask=per_head)


@hypothesis.given(
    b=st.integers(1, 2), t=st.integers(1, 6), s=st.integers(1, 6),
    kh=st.integers(1, 3), g=st.integers(1, 3), h=st.sampled_from([1, 4, 8]),
    hv=st.sampled_from([1, 3, 8]), causal=st.booleans(), seed=st.integers(0, 99))
def test_forward_property(b, t, s, kh, g, h, hv, causal, seed):
  q, k, v = _inputs(seed, b=b, t=t, s=s, n=kh * g, kh=kh, h=h, hv=hv)
  np_mask = np.tril(np.ones((t, s), bool)) if causal else None
  _check_forward(q, k, v, TOL[jnp.float32], np_mask=np_mask, is_causal=causal)


def test_float64_reference_is_exact():
  with jax.enable_x64(True):
    q, k, v = _inputs(5, dtype=jnp.float64)
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 7, 9)))
    sinks = jnp.asarray([0.1, 0.2, -0.3, 1.0], jnp.float64)
    _check_forward(q, k, v, TOL[jnp.float64],
                   np_mask=np.tril(np.ones((7, 9), bool)), bias=bias,
                   sinks=sinks, is_causal=True, logits_soft_cap=1.5)


@pytest.mark.parametrize('bias_shape', [(2, 4, 7, 9), (1, 4, 1, 9),
                                        (2, 1, 7, 1)])
def test_gradients(bias_shape):
  q, k, v = _inputs(6)
  rng = np.random.default_rng(2)
  bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0])
  mask = rng.random((2, 4, 7, 9)) < 0.75
  mask[0, 1, 3] = False  # a fully masked row
  dout = jnp.asarray(rng.normal(size=(2, 7, 4, 5)), jnp.float32)
  kwargs = dict(scale=0.4, logits_soft_cap=3.0)

  def loss(q, k, v, bias, sinks):
    out = attention.dot_product_attention(
        q, k, v, bias=bias, sinks=sinks, mask=jnp.asarray(mask),
        implementation='reference', **kwargs)
    return jnp.sum(out * dout)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, bias, sinks)
  want = oracles.numpy_attention_grads(
      _np(q), _np(k), _np(v), _np(dout), bias=_np(bias), mask=mask,
      sinks=_np(sinks), **kwargs)
  names = ('dq', 'dk', 'dv', 'dbias', 'dsinks')
  for name, g in zip(names, got):
    w = want[name]
    if name == 'dbias':
      w = oracles.reduce_to(w, bias_shape)
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=name)


def test_fully_masked_rows_are_zero_without_nan():
  q, k, v = _inputs(7)
  mask = np.ones((2, 4, 7, 9), bool)
  mask[:, :, 2] = False
  mask[1] = False

  def f(q, k, v):
    out, lse = attention.dot_product_attention(
        q, k, v, mask=jnp.asarray(mask), return_residuals=True,
        implementation='reference')
    return jnp.sum(out**2), (out, lse)

  grads, (out, lse) = jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert not any(bool(jnp.isnan(g).any()) for g in grads)
  np.testing.assert_array_equal(out[:, 2], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(grads[0][:, 2], 0.0)
  np.testing.assert_array_equal(grads[1][1], 0.0)
  assert np.all(np.isneginf(lse[:, :, 2]))


def test_jit_vmap_and_sharded():
  q, k, v = _inputs(8, b=8)
  fn = functools.partial(attention.dot_product_attention, is_causal=True,
                         implementation='reference')
  want = fn(q, k, v)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), want, atol=1e-6)
  vmapped = jax.vmap(lambda a, b_, c: fn(a[None], b_[None], c[None])[0])
  np.testing.assert_allclose(vmapped(q, k, v), want, atol=1e-6)


@pytest.mark.multidevice
def test_sharded_over_eight_devices(cpu_devices):
  q, k, v = _inputs(9, b=8)
  mesh = jax.sharding.Mesh(np.asarray(cpu_devices), ('data',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  qs, ks, vs = (jax.device_put(x, spec) for x in (q, k, v))
  fn = jax.jit(functools.partial(attention.dot_product_attention,
                                 is_causal=True, implementation='reference'))
  out = fn(qs, ks, vs)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, fn(q, k, v), atol=1e-6)


def test_default_implementation_runs():
  q, k, v = _inputs(10)
  out = attention.dot_product_attention(q, k, v, is_causal=True)
  want = attention.dot_product_attention(q, k, v, is_causal=True,
                                         implementation='reference')
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  assert 'reference' in attention.available_implementations()


def _bad(**overrides):
  q, k, v = _inputs(11)
  args = dict(query=q, key=k, value=v)
  args.update(overrides)
  return lambda: attention.dot_product_attention(
      args.pop('query'), args.pop('key'), args.pop('value'), **args)


BAD_INPUTS = [
    ('query', dict(query=jnp.zeros((2, 7, 4))), ValueError, 'query must have rank 4'),
    ('list', dict(query=[[1.0]]), TypeError, 'query must be an array'),
    ('int dtype', dict(key=jnp.zeros((2, 9, 2, 8), jnp.int32)), TypeError,
     'key must have a floating dtype'),
    ('batch', dict(key=jnp.zeros((3, 9, 2, 8))), ValueError, 'key batch'),
    ('head_dim', dict(key=jnp.zeros((2, 9, 2, 6))), ValueError, 'key head_dim'),
    ('value length', dict(value=jnp.zeros((2, 8, 2, 5))), ValueError,
     'value length'),
    ('value heads', dict(value=jnp.zeros((2, 9, 1, 5))), ValueError,
     'value heads'),
    ('gqa', dict(key=jnp.zeros((2, 9, 3, 8)), value=jnp.zeros((2, 9, 3, 5))),
     ValueError, 'multiple of key/value heads'),
    ('bias', dict(bias=jnp.zeros((2, 4, 7, 8))), ValueError,
     'bias must be broadcastable'),
    ('bias rank', dict(bias=jnp.zeros((7, 9))), ValueError,
     'bias must be broadcastable'),
    ('mask dtype', dict(mask=jnp.zeros((2, 4, 7, 9), jnp.int32)), TypeError,
     'mask must have dtype bool'),
    ('mask shape', dict(mask=jnp.zeros((2, 4, 9, 7), bool)), ValueError,
     'mask must be broadcastable'),
    ('mask object', dict(mask=masks.causal(9, 9)), ValueError,
     'mask must have shape'),
    ('mask heads', dict(mask=masks.from_array(np.ones((3, 7, 9), bool))),
     ValueError, 'mask num_heads'),
    ('scale', dict(scale=0.0), ValueError, 'scale must be positive'),
    ('scale nan', dict(scale=float('nan')), ValueError, 'scale must be positive'),
    ('scale type', dict(scale='1'), TypeError, 'scale must be'),
    ('cap', dict(logits_soft_cap=-1.0), ValueError, 'logits_soft_cap'),
    ('sinks', dict(sinks=jnp.zeros((3,))), ValueError, 'sinks length'),
    ('segment ids', dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), ValueError,
     'must be a pair'),
    ('segment dtype', dict(segment_ids=(jnp.zeros((2, 7)), jnp.zeros((2, 9)))),
     TypeError, 'q_segment_ids must have an integer dtype'),
    ('segment shape', dict(segment_ids=(jnp.zeros((2, 7), jnp.int32),
                                        jnp.zeros((2, 8), jnp.int32))),
     ValueError, 'kv_segment_ids must have shape'),
    ('is_causal', dict(is_causal=1), TypeError, 'is_causal must be a bool'),
    ('implementation', dict(implementation='cuda'), ValueError,
     'implementation must be one of'),
]


@pytest.mark.parametrize('name,overrides,exc,match', BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, overrides, exc, match):
  del name
  with pytest.raises(exc, match=match):
    _bad(**overrides)()


def test_mask_bool_raises():
  with pytest.raises(TypeError, match='no truth value'):
    bool(masks.causal(4))


def _naive_attention(q, k, v, bias, sinks, mask):
  """Plain autodiff formula (float64): the oracle of the reference's custom JVP."""
  g = q.shape[2] // k.shape[2]
  kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  z = jnp.einsum('btnh,bsnh->bnts', q, kr) * 0.4 + bias  # [B, N, T, S]
  z = jnp.where(mask, z, -jnp.inf)
  zs = jnp.concatenate([z, jnp.broadcast_to(sinks[None, :, None, None],
                                            z.shape[:3] + (1,))], -1)
  lse = jax.nn.logsumexp(zs, axis=-1)  # [B, N, T]
  p = jnp.exp(z - lse[..., None])
  return jnp.einsum('bnts,bsnv->btnv', p, vr), lse


def test_reference_jvp_and_second_order_match_autodiff_form():
  """Forward-mode, lse cotangents and Hessian-vector products (custom JVP)."""
  with jax.enable_x64(True):
    q, k, v = _inputs(11, dtype=jnp.float64)
    rng = np.random.default_rng(3)
    bias = jnp.asarray(rng.normal(size=(2, 4, 7, 9)))
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0])
    mask = jnp.asarray(rng.random((2, 4, 7, 9)) < 0.7) | jnp.eye(7, 9, dtype=bool)

    def ours(q, k, v, bias, sinks):
      return attention.dot_product_attention(
          q, k, v, bias=bias, sinks=sinks, mask=mask, scale=0.4,
          return_residuals=True, implementation='reference')

    def naive(q, k, v, bias, sinks):
      return _naive_attention(q, k, v, bias, sinks, mask)

    args = (q, k, v, bias, sinks)
    tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
    jvp = jax.jit(lambda fn, a, t: jax.jvp(fn, a, t), static_argnums=0)
    for got, want in zip(jvp(ours, args, tangents), jvp(naive, args, tangents)):
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-10, rtol=1e-10)

    def scalar(fn):
      return lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(jnp.sin(fn(*a)[1]))

    hvp = lambda fn: jax.jit(lambda a, t: jax.jvp(
        jax.grad(scalar(fn), argnums=(0, 1, 2, 3, 4)), a, t)[1])(args, tangents)
    for g, w in zip(hvp(ours), hvp(naive)):
      np.testing.assert_allclose(g, w, atol=1e-9, rtol=1e-9)
