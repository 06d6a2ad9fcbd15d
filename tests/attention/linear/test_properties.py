"""Property tests: chunked == naive over random shapes, chunk sizes and decays."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from attention import linear
from tests.attention.linear import helpers


@hypothesis.given(
    b=st.integers(1, 2), t=st.integers(1, 40), kh=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]), hk=st.integers(1, 9), hv=st.integers(1, 9),
    chunk=st.integers(1, 48), variant=st.sampled_from(
        ['linear', 'lightning', 'retention', 'gla_head']),
    rate=st.floats(0.0, 3.0), with_state=st.booleans(), seed=st.integers(0, 999))
def test_chunked_matches_naive(b, t, kh, group, hk, hv, chunk, variant, rate,
                               with_state, seed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    n = kh * group
    q = helpers.rand(rng, b, t, n, hk)
    k = helpers.rand(rng, b, t, kh, hk)
    v = helpers.rand(rng, b, t, kh, hv)
    s0 = helpers.rand(rng, b, n, hk, hv) if with_state else None
    if variant == 'lightning':
      extra = jnp.asarray(rng.uniform(0.0, rate, size=n))
    elif variant == 'retention':
      extra = jnp.asarray(np.exp(-rng.uniform(0.0, rate, size=n)))
    elif variant == 'gla_head':
      extra = -jnp.asarray(rng.uniform(0.0, rate, size=(b, t, n)))
    else:
      extra = None
    kw = dict(initial_state=s0)
    if variant == 'linear':
      kw.update(feature_map='identity', normalize=False)
    naive, _, chunked = helpers.forms(variant, jit=True)
    ref, ref_final = naive(q, k, v, extra, **kw)
    out, final = chunked(q, k, v, extra, chunk_size=chunk, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(final, ref_final, rtol=1e-9, atol=1e-10)


@hypothesis.given(t=st.integers(1, 30),
                  chunk=st.integers(1, 40), normalize=st.booleans(),
                  seed=st.integers(0, 999))
def test_normalised_chunked_matches_naive(t, chunk, normalize, seed):
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    q, k = helpers.rand(rng, 1, t, 2, 4), helpers.rand(rng, 1, t, 2, 4)
    v = helpers.rand(rng, 1, t, 2, 3)
    ref, ref_final = jax.jit(linear.naive_linear_attention,
                             static_argnames='normalize')(q, k, v,
                                                          normalize=normalize)
    out, final = jax.jit(linear.chunked_linear_attention,
                         static_argnames=('chunk_size', 'normalize'))(
                             q, k, v, normalize=normalize, chunk_size=chunk)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(final, ref_final, rtol=1e-9, atol=1e-10)
