"""The Pallas linear-attention chunk kernel (interpret mode) against the naive form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import linear
from kernels.pallas import linear as pallas_linear
from tests.attention.linear import helpers

IMPLS = ('pallas_tpu', 'pallas_gpu')
CHUNK = {'pallas_tpu': 8, 'pallas_gpu': 16}


def _case(name, rng, b, t, n, hk, dtype):
  """(dispatching fn, naive fn, decay argument) of a variant."""
  if name == 'linear':
    return (linear.linear_attention, linear.naive_linear_attention, None)
  if name == 'linear_unnormalised':
    f = lambda fn: (lambda *a, **kw: fn(*a, feature_map='relu', normalize=False,
                                        **kw))
    return f(linear.linear_attention), f(linear.naive_linear_attention), None
  if name == 'lightning':
    return (lambda q, k, v, e, **kw: linear.lightning_attention(
        q, k, v, slopes=e, **kw), lambda q, k, v, e, **kw:
            linear.naive_lightning_attention(q, k, v, slopes=e, **kw),
            jnp.asarray(linear.lightning_slopes(n), dtype))
  if name == 'retention':
    return (lambda q, k, v, e, **kw: linear.retention(q, k, v, gammas=e, **kw),
            lambda q, k, v, e, **kw: linear.naive_retention(q, k, v, gammas=e,
                                                            **kw),
            jnp.asarray(linear.retention_gammas(n), dtype))
  return (linear.gated_linear_attention, linear.naive_gated_linear_attention,
          linear.gla_log_gates(helpers.rand(rng, b, t, n, dtype=dtype), 2.0))


def _call(fn, extra, q, k, v, **kw):
  return fn(q, k, v, **kw) if extra is None else fn(q, k, v, extra, **kw)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', ['linear', 'linear_unnormalised', 'lightning',
                                  'retention', 'gla'])
def test_kernel_forward_and_gradients_match_naive_float64(impl, name):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    b, t, n, hk, hv = 1, 19, 2, 4, 3
    q, k, v = (helpers.rand(rng, b, t, n, hk), helpers.rand(rng, b, t, 1, hk),
               helpers.rand(rng, b, t, 1, hv))
    fn, naive, extra = _case(name, rng, b, t, n, hk, np.float64)
    width = hv + 1 if name == 'linear' else hv
    s0 = jnp.abs(helpers.rand(rng, b, n, hk, width))
    w = helpers.rand(rng, b, t, n, hv)

    def loss(f, kw, q, k, v, s0, extra):
      out, final = _call(f, extra, q, k, v, initial_state=s0, **kw)
      return jnp.sum(out * w) + jnp.sum(jnp.sin(final)), (out, final)

    argnums = (2, 3, 4, 5) + (() if extra is None else (6,))
    run = lambda f, kw: jax.jit(jax.value_and_grad(
        lambda *a: loss(f, kw, *a), tuple(i - 2 for i in argnums),
        has_aux=True))(q, k, v, s0, extra)
    (_, (out, final)), grads = run(fn, dict(implementation=impl,
                                           chunk_size=CHUNK[impl]))
    (_, (ref, ref_final)), ref_grads = run(naive, {})
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(final, ref_final, rtol=1e-10, atol=1e-11)
    for g, g0 in zip(grads, ref_grads):
      np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('impl', IMPLS)
def test_kernel_float32_three_way(impl):
  rng = np.random.default_rng(1)
  b, t, n, hk = 2, 40, 2, 8
  with jax.enable_x64(True):
    q, k, v = (helpers.rand(rng, b, t, n, hk) for _ in range(3))
    g = linear.gla_log_gates(helpers.rand(rng, b, t, n), 4.0)
    gold, gold_final = linear.naive_gated_linear_attention(q, k, v, g)
  f32 = lambda a: a.astype(jnp.float32)
  ref, ref_final = linear.naive_gated_linear_attention(f32(q), f32(k), f32(v),
                                                       f32(g))
  out, final = linear.gated_linear_attention(
      f32(q), f32(k), f32(v), f32(g), implementation=impl, chunk_size=16)
  assert out.dtype == jnp.float32
  err = lambda a, gld: float(np.max(np.abs(np.asarray(a, np.float64) -
                                           np.asarray(gld))))
  floor = helpers.FLOOR[jnp.float32] * float(np.max(np.abs(gold)))
  fudge = helpers.FUDGE[jnp.float32]
  assert err(out, gold) <= fudge * max(err(ref, gold), floor)
  assert err(final, gold_final) <= fudge * max(err(ref_final, gold_final), floor)


def test_dispatch_defaults_and_unsupported_inputs():
  rng = np.random.default_rng(2)
  q, k, v = (helpers.rand(rng, 1, 12, 2, 4, dtype=np.float32) for _ in range(3))
  # CPU default: the chunked XLA form, bit for bit.
  np.testing.assert_array_equal(
      linear.lightning_attention(q, k, v)[0],
      linear.chunked_lightning_attention(q, k, v)[0])
  seg = jnp.asarray([[0] * 5 + [1] * 7])
  with pytest.raises(ValueError, match="'pallas_gpu' does not support .*segment"):
    linear.lightning_attention(q, k, v, segment_ids=seg,
                               implementation='pallas_gpu')
  with pytest.raises(ValueError, match='per-key-dimension gates'):
    linear.gated_linear_attention(q, k, v, jnp.zeros((1, 12, 2, 4)),
                                  implementation='pallas_tpu')
  with pytest.raises(ValueError, match='causal=False'):
    linear.linear_attention(q, k, v, causal=False, implementation='pallas_tpu')
  with pytest.raises(ValueError, match='implementation must be one of'):
    linear.retention(q, k, v, implementation='triton')
  with pytest.raises(ValueError, match='multiple of 8'):
    linear.retention(q, k, v, implementation='pallas_tpu', chunk_size=12)
  with pytest.raises(ValueError, match='multiple of 128 on TPU'):
    pallas_linear.check_chunk_size('tpu', 64, interpret=False)
  with pytest.raises(ValueError, match='power of two >= 16 on GPU'):
    pallas_linear.check_chunk_size('gpu', 48, interpret=False)
  pallas_linear.check_chunk_size('tpu', 256, interpret=False)
  pallas_linear.check_chunk_size('gpu', 32, interpret=False)
  with pytest.raises(ValueError, match='backend must be one of'):
    pallas_linear.chunked(q, k, v, None, None, backend='cpu')
