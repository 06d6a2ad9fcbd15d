"""FlashBias: the low-rank bias path as augmented q / k equals the dense-bias path.

Oracles: the NumPy float64 dense softmax (and its analytic backward) of
tests.oracles with the dense ALiBi bias m_n (j - i); NumPy's SVD of the stacked
biases (Eckart-Young tail) for the factor errors; NumPy linear biases.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import registry
from attention import score_mods
from attention.variants import flash_bias as fb
from kernels import problem as problem_lib
from kernels import reference
from kernels import xla
from kernels.pallas import gpu as pallas_gpu
from kernels.pallas import tpu as pallas_tpu
from tests import oracles

# Pallas in interpret mode with 16 x 16 tiles (T = 32: two blocks each way).
_KERNELS = {
    'reference': reference.attention,
    'xla': xla.attention,
    'pallas_tpu': functools.partial(
        pallas_tpu.attention, block_sizes=pallas_tpu.BlockSizes(16, 16)),
    'pallas_gpu': functools.partial(
        pallas_gpu.attention, block_sizes=pallas_gpu.BlockSizes(16, 16)),
}


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed, b, t, n, kh, h, hv, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h)).astype(dtype)
  k = rng.normal(size=(b, t, kh, h)).astype(dtype)
  v = rng.normal(size=(b, t, kh, hv)).astype(dtype)
  return q, k, v, rng


def _alibi_bias(slopes, t, s):
  rel = np.arange(s)[None, :] - np.arange(t)[:, None]  # j - i
  return np.asarray(slopes, np.float64)[:, None, None] * rel  # [N, T, S]


@pytest.mark.parametrize('impl', list(_KERNELS))
def test_alibi_low_rank_equals_dense_forward(impl):
  """All four implementations, causal GQA (N=4, K=2), H_v != H + R, sinks, lse."""
  b, t, n, kh, h, hv = 1, 32, 4, 2, 8, 6
  q, k, v, rng = _inputs(0, b, t, n, kh, h, hv, np.float32)
  sinks = rng.normal(size=(n,)).astype(np.float32)
  slopes = score_mods.alibi_slopes(n)
  mask = np.tril(np.ones((t, t), bool))
  want, want_lse = oracles.numpy_attention(q, k, v, scale=h ** -0.5, mask=mask,
                                           bias=_alibi_bias(slopes, t, t)[None],
                                           sinks=sinks)
  u, vf = fb.alibi_factors(n, t, t)
  assert u.shape == (1, t, n, 2) and vf.shape == (1, t, 1, 2)
  q_aug, k_aug, scale = fb.augment_qk(jnp.asarray(q), jnp.asarray(k), u, vf)
  assert q_aug.shape == (b, t, n, h + 2) and k_aug.shape == (b, t, kh, h + 2)
  assert scale == 1.0
  problem = problem_lib.make_problem(q_aug, k_aug, jnp.asarray(v), scale=scale,
                                     is_causal=True, sinks=jnp.asarray(sinks),
                                     return_residuals=True)
  out, lse = jax.jit(_KERNELS[impl], static_argnums=3)(q_aug, k_aug, jnp.asarray(v),
                                                       problem)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5)


def test_alibi_low_rank_gradients():
  """dq, dk, dv, dsinks and the slopes' gradient vs the float64 analytic backward of
  the dense-bias softmax (reference and xla)."""
  b, t, n, kh, h, hv = 2, 8, 4, 2, 4, 3
  q, k, v, rng = _inputs(1, b, t, n, kh, h, hv)
  slopes = score_mods.alibi_slopes(n) * 1.5
  sinks = rng.normal(size=(n,))
  dout = rng.normal(size=(b, t, n, hv))
  mask = np.tril(np.ones((t, t), bool))
  kw = dict(scale=h ** -0.5, mask=mask, bias=_alibi_bias(slopes, t, t)[None],
            sinks=sinks)
  want, _ = oracles.numpy_attention(q, k, v, **kw)
  want_g = oracles.numpy_attention_grads(q, k, v, dout, **kw)
  rel = np.arange(t)[None, :] - np.arange(t)[:, None]
  want_dslopes = np.einsum('bnts,ts->n', want_g['dbias'], rel)
  for impl in ('reference', 'xla'):
    def loss(q, k, v, sinks, slopes):
      out = fb.alibi_flash_bias_attention(q, k, v, slopes=slopes, is_causal=True,
                                          sinks=sinks, implementation=impl)
      return jnp.sum(out * dout), out
    args = tuple(jnp.asarray(x) for x in (q, k, v, sinks, slopes))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5),
                                                 has_aux=True))(*args)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-10, err_msg=impl)
    for name, g, gw in zip(('dq', 'dk', 'dv', 'dsinks', 'dslopes'), grads,
                           (want_g['dq'], want_g['dk'], want_g['dv'],
                            want_g['dsinks'], want_dslopes)):
      np.testing.assert_allclose(np.asarray(g), gw, atol=1e-9,
                                 err_msg=f'{impl} {name}')


def test_linear_bias_factors_exact():
  n, t, s = 3, 5, 7
  rng = np.random.default_rng(2)
  a, c, g = (rng.normal(size=(n,)) for _ in range(3))
  u, v = fb.linear_bias_factors(jnp.asarray(a), jnp.asarray(c), t, s,
                                offset=jnp.asarray(g))
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  want = a[:, None, None] * i + c[:, None, None] * j + g[:, None, None]
  np.testing.assert_allclose(np.asarray(fb.bias_from_factors(u, v))[0], want,
                             atol=1e-12)
  # ALiBi: m (j - i), one key factor for every head.
  u, v = fb.alibi_factors(n, t, s, slopes=jnp.asarray(a))
  np.testing.assert_allclose(np.asarray(fb.bias_from_factors(u, v))[0],
                             _alibi_bias(a, t, s), atol=1e-12)


@pytest.mark.parametrize('kh', [4, 2])
def test_svd_error_shrinks_and_is_exact_at_full_rank(kh):
  b, n, t, s = 2, 4, 3, 4
  g = n // kh
  bias = np.random.default_rng(3).normal(size=(b, n, t, s))
  stacked = bias.reshape(b, kh, g * t, s)
  sig = np.linalg.svd(stacked, compute_uv=False)  # [B, K, min]
  full = min(g * t, s)  # 3 per head, 4 for the stacked pairs
  errors = []
  for rank in range(1, full + 1):
    u, v, err = fb.svd_bias_factors(jnp.asarray(bias), rank, num_kv_heads=kh)
    assert u.shape == (b, t, n, rank) and v.shape == (b, s, kh, rank)
    approx = np.asarray(fb.bias_from_factors(u, v))
    direct = np.linalg.norm(bias - approx) / np.linalg.norm(bias)
    tail = np.sqrt(np.sum(sig[..., rank:] ** 2)) / np.linalg.norm(bias)
    np.testing.assert_allclose(float(err), direct, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(err), tail, rtol=1e-9, atol=1e-12)  # optimal
    errors.append(float(err))
  assert np.all(np.diff(errors) < 0) and errors[-1] < 1e-13
  # Randomized range finder: the optimal error on an exactly rank-3 bias + noise.
  r4 = np.random.default_rng(4)
  low = np.einsum('btnr,bsnr->bnts', r4.normal(size=(b, t, n, 3)),
                  r4.normal(size=(b, s, n, 3)))
  _, _, e_exact = fb.svd_bias_factors(jnp.asarray(low), 3)
  _, _, e_rand = fb.svd_bias_factors(jnp.asarray(low), 3, method='randomized')
  assert float(e_exact) < 1e-12 and float(e_rand) < 1e-10


def test_svd_factors_through_attention():
  """flash_bias_attention with SVD factors == dense attention with U V^T; at full
  rank == dense attention with the original bias (GQA, xla)."""
  b, t, n, kh, h = 1, 8, 4, 2, 4
  q, k, v, rng = _inputs(5, b, t, n, kh, h, h)
  bias = rng.normal(size=(1, n, t, t))
  mask = np.tril(np.ones((t, t), bool))
  for rank, exact in ((3, False), (t, True)):  # full rank: min(G T, S) = T
    u, vf, err = fb.svd_bias_factors(jnp.asarray(bias), rank, num_kv_heads=kh)
    target = bias if exact else np.asarray(fb.bias_from_factors(u, vf))
    want, _ = oracles.numpy_attention(q, k, v, scale=h ** -0.5, mask=mask,
                                      bias=target)
    got = fb.flash_bias_attention(*(jnp.asarray(x) for x in (q, k, v)), u, vf,
                                  is_causal=True, implementation='xla')
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-10)
    assert (float(err) < 1e-12) == exact


def test_registry_alibi_flashbias_equals_alibi():
  q, k, v, _ = _inputs(6, 1, 8, 4, 1, 4, 4)
  args = tuple(jnp.asarray(x) for x in (q, k, v))
  kw = dict(mask=None, is_causal=True, sinks=None, logits_soft_cap=None,
            implementation='xla')
  got, aux = registry.get_variant('alibi_flashbias')(*args, **kw)
  want, _ = registry.get_variant('alibi')(*args, **kw)
  assert aux == {}
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)
  with pytest.raises(ValueError, match='causal only'):
    registry.get_variant('alibi_flashbias')(*args, **dict(kw, is_causal=False))


def test_bad_input():
  bias = jnp.ones((2, 4, 3))
  for rank in (0, 4):
    with pytest.raises(ValueError, match='rank must be'):
      fb.svd_bias_factors(bias, rank)
  with pytest.raises(ValueError, match='num_kv_heads must divide'):
    fb.svd_bias_factors(bias, 1, num_kv_heads=3)
  with pytest.raises(ValueError, match='bias must have shape'):
    fb.svd_bias_factors(jnp.ones((4, 3)), 1)
  with pytest.raises(ValueError, match='method must be'):
    fb.svd_bias_factors(bias, 1, method='qr')
  q, k = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 5, 2, 2))
  u, v = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 5, 2, 2))
  fb.augment_qk(q, k, u, v)  # fine
  with pytest.raises(ValueError, match='u must have shape'):
    fb.augment_qk(q, k, jnp.ones((1, 5, 4, 2)), v)
  with pytest.raises(ValueError, match='v must have shape'):  # per query head
    fb.augment_qk(q, k, u, jnp.ones((1, 5, 4, 2)))
  with pytest.raises(ValueError, match='share their rank'):
    fb.augment_qk(q, k, u, jnp.ones((1, 5, 2, 3)))
  with pytest.raises(ValueError, match='slopes must have shape'):
    fb.alibi_factors(4, 4, 4, slopes=jnp.ones((3,)))
  with pytest.raises(ValueError, match='logits_soft_cap must be None'):
    fb.flash_bias_attention(q, k, jnp.ones((1, 5, 2, 2)), u, v, logits_soft_cap=5.0)
  with pytest.raises(ValueError, match='scale must be positive'):
    fb.augment_qk(q, k, u, v, scale=-1.0)
