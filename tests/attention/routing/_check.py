"""Shared float64 checks for the routing tests: routed attention == dense oracle."""

import jax
import numpy as np

from tests import oracles


def assert_matches_dense_oracle(fn, q, k, v, dense_mask, *, atol=1e-9):
  """fn(q, k, v) -> out must equal the NumPy float64 oracle with `dense_mask`
  [B?, N, T, S], forward and the gradients of sum(out * dout) wrt q, k, v."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = 1.0 / np.sqrt(q.shape[-1])
  mask = np.asarray(dense_mask, bool)
  want, _ = oracles.numpy_attention(q, k, v, scale=scale, mask=mask)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(fn)(q, k, v))
    np.testing.assert_allclose(got, want, atol=atol, rtol=1e-9)
    dout = np.random.default_rng(7).normal(size=got.shape)
    grads = jax.jit(jax.grad(lambda *a: (fn(*a) * dout).sum(),
                             argnums=(0, 1, 2)))(q, k, v)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=scale, mask=mask)
  for g, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(np.asarray(g), ref[name], atol=atol, rtol=1e-8,
                               err_msg=name)
