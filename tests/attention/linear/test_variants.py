"""Feature maps, normalisation, decay parameters and input validation of the family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import linear
from tests.attention.linear import helpers


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


FEATURES = {
    'elu+1': lambda x: np.where(x > 0, x + 1.0, np.exp(x)),
    'relu': lambda x: np.maximum(x, 0.0),
    'identity': lambda x: x,
    'exp': np.exp,
}


@pytest.mark.parametrize('feature', [*FEATURES, 'callable'])
@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('causal', [True, False])
def test_linear_attention_feature_maps_against_numpy(feature, normalize, causal):
  rng = np.random.default_rng(1)
  b, t, n, hk, hv = 2, 11, 2, 3, 4
  q, k = helpers.rand(rng, b, t, n, hk), helpers.rand(rng, b, t, n, hk)
  v = helpers.rand(rng, b, t, n, hv)
  seg = jnp.asarray([[0] * 4 + [1] * 7, [0] * 11])
  if feature == 'callable':
    fmap, np_fmap = (lambda x: jnp.square(x) + 0.1), (lambda x: x * x + 0.1)
  else:
    fmap, np_fmap = feature, FEATURES[feature]
  fq, fk = np_fmap(np.asarray(q)), np_fmap(np.asarray(k))
  vv = np.concatenate([np.asarray(v), np.ones((b, t, n, 1))], -1)
  ref, ref_state = helpers.numpy_recurrence(fq, fk, vv, scale=0.25,
                                            segment_ids=seg, causal=causal)
  if normalize:
    ref = ref[..., :-1] / (ref[..., -1:] + 1e-6)
  else:
    ref = ref[..., :-1]
  for fn, kw in ((linear.naive_linear_attention, {}),
                 (linear.recurrent_linear_attention, {}),
                 (linear.chunked_linear_attention, dict(chunk_size=4))):
    out, state = jax.jit(functools.partial(
        fn, feature_map=fmap, normalize=normalize, causal=causal, scale=0.25,
        **kw))(q, k, v, segment_ids=seg)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-10)
    if not causal:
      assert state is None
    elif normalize:
      np.testing.assert_allclose(state, ref_state, rtol=1e-10, atol=1e-12)
    else:
      assert state.shape == (b, n, hk, hv)


def test_lightning_slopes():
  # Power of two: s_h = 2^(-8h/N), h = 1..N.
  np.testing.assert_allclose(linear.lightning_slopes(8),
                             2.0 ** (-8.0 * np.arange(1, 9) / 8))
  np.testing.assert_allclose(linear.lightning_slopes(4),
                             2.0 ** (-8.0 * np.arange(1, 5) / 4))
  # ALiBi's interleaving for 6 heads: 4-head slopes then every other 8-head slope.
  np.testing.assert_allclose(linear.alibi_slopes(6),
                             [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
  # Per-layer scaling (1 - l / (L - 1) + 1e-5).
  base = linear.lightning_slopes(4)
  np.testing.assert_allclose(
      linear.lightning_slopes(4, layer_index=1, num_layers=5),
      base * (1 - 1 / 4 + 1e-5))
  np.testing.assert_allclose(
      linear.lightning_slopes(4, layer_index=4, num_layers=5), base * 1e-5)
  with pytest.raises(ValueError, match='layer_index and num_layers'):
    linear.lightning_slopes(4, layer_index=1)
  with pytest.raises(ValueError, match='layer_index must be'):
    linear.lightning_slopes(4, layer_index=5, num_layers=5)
  with pytest.raises(ValueError, match='num_heads'):
    linear.lightning_slopes(0)


def test_lightning_default_slopes_and_retention_gammas_are_the_papers():
  rng = np.random.default_rng(2)
  q, k, v = (helpers.rand(rng, 1, 9, 4, 3) for _ in range(3))
  out, _ = linear.naive_lightning_attention(q, k, v)
  d = np.arange(9)[:, None] - np.arange(9)[None, :]
  slopes = 2.0 ** (-8.0 * np.arange(1, 5) / 4)
  m = np.where(d >= 0, np.exp(-slopes[:, None, None] * np.maximum(d, 0)), 0.0)
  scores = np.einsum('btnk,bsnk->bnts', q, k) / np.sqrt(3) * m[None]
  np.testing.assert_allclose(out, np.einsum('bnts,bsnv->btnv', scores, v),
                             rtol=1e-12, atol=1e-12)
  gam = 1 - 2.0 ** (-5.0 - np.arange(4))
  np.testing.assert_allclose(linear.retention_gammas(4), gam)
  out, _ = linear.naive_retention(q, k, v)
  m = np.where(d >= 0, gam[:, None, None] ** np.maximum(d, 0), 0.0)
  scores = np.einsum('btnk,bsnk->bnts', q, k) / np.sqrt(3) * m[None]
  np.testing.assert_allclose(out, np.einsum('bnts,bsnv->btnv', scores, v),
                             rtol=1e-12, atol=1e-12)


def test_gla_log_gates():
  x = jnp.asarray([-3.0, 0.0, 2.0])
  np.testing.assert_allclose(linear.gla_log_gates(x, tau=4.0),
                             np.log((1 / (1 + np.exp(-np.asarray(x)))) ** 0.25))
  with pytest.raises(ValueError, match='tau'):
    linear.gla_log_gates(x, tau=0.0)


def _qkv():
  rng = np.random.default_rng(0)
  return (helpers.rand(rng, 2, 5, 4, 3), helpers.rand(rng, 2, 5, 2, 3),
          helpers.rand(rng, 2, 5, 2, 6))


@pytest.mark.parametrize('call,match', [
    (lambda q, k, v: linear.chunked_lightning_attention(
        q, k, v, slopes=jnp.asarray([0.1, -0.2, 0.3, 0.4])), 'slopes must be'),
    (lambda q, k, v: linear.chunked_lightning_attention(
        q, k, v, slopes=jnp.ones(3)), r'slopes must have shape \(4,\)'),
    (lambda q, k, v: linear.chunked_retention(
        q, k, v, gammas=jnp.asarray([0.9, -0.5, 0.9, 0.9])), 'gammas must be'),
    (lambda q, k, v: linear.chunked_retention(
        q, k, v, gammas=jnp.asarray([0.9, 1.5, 0.9, 0.9])), 'gammas must be'),
    (lambda q, k, v: linear.chunked_gated_linear_attention(
        q, k, v, jnp.full((2, 5, 4), 0.1)), 'log_gates must be <= 0'),
    (lambda q, k, v: linear.chunked_gated_linear_attention(
        q, k, v, jnp.zeros((2, 5, 2))), r'log_gates must have shape \(2, 5, 4\)'),
    (lambda q, k, v: linear.recurrent_gated_linear_attention(
        q, k, v, jnp.zeros((2, 5, 4, 2))), 'log_gates must have shape'),
    (lambda q, k, v: linear.chunked_linear_attention(q, k, v, chunk_size=0),
     'chunk_size must be a positive int'),
    (lambda q, k, v: linear.chunked_lightning_attention(q, k, v, chunk_size=-4),
     'chunk_size must be a positive int'),
    (lambda q, k, v: linear.chunked_lightning_attention(
        q, k, v, initial_state=jnp.zeros((2, 4, 3, 5))),
     r'initial_state must have shape \(2, 4, 3, 6\)'),
    (lambda q, k, v: linear.chunked_linear_attention(
        q, k, v, initial_state=jnp.zeros((2, 4, 3, 6))),
     r'initial_state must have shape \(2, 4, 3, 7\)'),
    (lambda q, k, v: linear.naive_linear_attention(
        q, k, v, causal=False, initial_state=jnp.zeros((2, 4, 3, 7))),
     'initial_state requires causal=True'),
    (lambda q, k, v: linear.chunked_linear_attention(
        q, k, v, segment_ids=jnp.zeros((2, 4), jnp.int32)),
     r'segment_ids must have shape \(2, 5\)'),
    (lambda q, k, v: linear.chunked_linear_attention(q, k[:, :4], v),
     "key and value must share"),
    (lambda q, k, v: linear.chunked_linear_attention(q, k[:, :4], v[:, :4]),
     'may differ from the query length'),
    (lambda q, k, v: linear.linear_attention(
        q, k[:, :4], v[:, :4], causal=False,
        segment_ids=jnp.zeros((2, 5), jnp.int32)),
     'may differ from the query length'),
    (lambda q, k, v: linear.chunked_linear_attention(q, k[:, :, :1], v),
     'value heads must equal key heads'),
    (lambda q, k, v: linear.chunked_linear_attention(q[:, :, :3], k, v),
     'must be a multiple of key heads'),
    (lambda q, k, v: linear.chunked_linear_attention(q, k, v,
                                                     feature_map='softplus'),
     'feature_map must be one of'),
    (lambda q, k, v: linear.chunked_linear_attention(
        q, k, v, feature_map=lambda x: x[..., :1]), 'feature_map must preserve'),
    (lambda q, k, v: linear.chunked_linear_attention(q[0], k, v),
     'query must have rank 4'),
    (lambda q, k, v: linear.chunked_linear_attention(q, k, v, scale=-1.0),
     'scale must be positive'),
])
def test_bad_inputs_raise_naming_the_argument(call, match):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=match):
    call(q, k, v)


def test_bad_types():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match='chunk_size'):
    linear.chunked_linear_attention(q, k, v, chunk_size=2.5)
  with pytest.raises(TypeError, match='segment_ids must have an integer'):
    linear.chunked_linear_attention(q, k, v, segment_ids=jnp.zeros((2, 5)))
  with pytest.raises(TypeError, match='log_gates must be an array'):
    linear.chunked_gated_linear_attention(q, k, v, None)


@pytest.mark.parametrize('t,s', [(1, 17), (3, 40), (12, 5)])
@pytest.mark.parametrize('normalize', [True, False])
def test_non_causal_cross_lengths_against_numpy(t, s, normalize):
  # One (or a few) queries over S context tokens: phi(q) (phi(K)^T V) / phi(q) z.
  rng = np.random.default_rng(t * 100 + s)
  b, n, kh, hk, hv = 2, 4, 2, 3, 5
  q = helpers.rand(rng, b, t, n, hk)
  k, v = helpers.rand(rng, b, s, kh, hk), helpers.rand(rng, b, s, kh, hv)
  fq = np.where(np.asarray(q) > 0, np.asarray(q) + 1, np.exp(np.asarray(q)))
  fk = np.where(np.asarray(k) > 0, np.asarray(k) + 1, np.exp(np.asarray(k)))
  fk, vv = np.repeat(fk, 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
  num = np.einsum('btnk,bsnk,bsnv->btnv', fq, fk, vv) * 0.3
  ref = num / (np.einsum('btnk,bsnk->btn', fq, fk)[..., None] * 0.3 + 1e-6) \
      if normalize else num
  grads = []
  for fn in (linear.naive_linear_attention, linear.recurrent_linear_attention,
             linear.chunked_linear_attention, linear.linear_attention):
    call = functools.partial(fn, causal=False, normalize=normalize, scale=0.3)
    out, state = jax.jit(call)(q, k, v)
    assert state is None and out.shape == (b, t, n, hv)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    grads.append(jax.jit(jax.grad(lambda q, k, v, call=call: jnp.sum(jnp.sin(
        call(q, k, v)[0])), (0, 1, 2)))(q, k, v))
  for g in grads[1:]:
    for a, a0 in zip(g, grads[0]):
      np.testing.assert_allclose(a, a0, rtol=1e-9, atol=1e-11)
