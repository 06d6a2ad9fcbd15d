"""kernels.xla.score_transform against jax autodiff of the composed transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import problem as problem_lib
from kernels.xla import score_transform



@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _mod():
  """A non-additive mod with a float table, a float scalar and an int leaf."""

  def fn(params, s, b, h, q_idx, kv_idx):
    table, gain, shift = params['table'], params['gain'], params['shift']
    rel = jnp.clip(q_idx - kv_idx + shift, 0, table.shape[0] - 1)
    return s * (gain + 0.5 * h) + table[rel] + 0.1 * b

  return problem_lib.ScoreMod(fn=fn, params={
      'table': jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float64),
      'gain': jnp.float64(1.3), 'shift': jnp.int32(2)})


def _index(shape):
  b, h, t, s = shape
  return (jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1),
          jnp.arange(h, dtype=jnp.int32).reshape(1, h, 1, 1),
          jnp.arange(t, dtype=jnp.int32).reshape(1, 1, t, 1),
          jnp.arange(s, dtype=jnp.int32).reshape(1, 1, 1, s))


def _direct(z, cap, mod, floats, index):
  """The chain written out: mod(cap * tanh(z)) with the float params given."""
  s = z if cap is None else cap * jnp.tanh(z)
  if mod is None:
    return s
  params = dict(mod.params, gain=floats[0], table=floats[1])  # Leaf order.
  return mod.fn(params, s, *index)


@pytest.mark.parametrize('cap', [None, 2.5])
@pytest.mark.parametrize('with_mod', [False, True])
def test_transform_and_vjp_match_autodiff(cap, with_mod):
  shape = (2, 3, 4, 5)
  z = jax.random.normal(jax.random.key(0), shape, jnp.float64) * 2
  ds = jax.random.normal(jax.random.key(1), shape, jnp.float64)
  mod = _mod() if with_mod else None
  index = _index(shape)
  calls = []

  def index_fn():
    calls.append(1)
    return index

  s, tanh, vjp = score_transform.transform(z, cap, mod, index_fn, mod_vjp=True,
                                           mod_params=True)
  floats = [] if mod is None else [mod.params['gain'], mod.params['table']]
  want, pull = jax.vjp(lambda z, f: _direct(z, cap, mod, f, index), z, floats)
  np.testing.assert_allclose(s, want, rtol=1e-13, atol=1e-13)
  assert (tanh is None) == (cap is None)
  assert (vjp is None) == (mod is None)
  assert len(calls) == int(with_mod)  # Indices are built only for a score_mod.
  dmod0 = None if mod is None else score_transform.zero_float_grads(mod)
  dz, dmod = score_transform.transform_vjp(ds, cap, tanh, vjp, dmod0)
  want_dz, want_df = pull(ds)
  np.testing.assert_allclose(dz, want_dz, rtol=1e-12, atol=1e-12)
  if mod is not None:
    for got, ref in zip(dmod, want_df):
      np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # Accumulates across tiles: a second tile adds its gradients.
    _, dmod2 = score_transform.transform_vjp(ds, cap, tanh, vjp, dmod)
    for got, ref in zip(dmod2, want_df):
      np.testing.assert_allclose(got, 2 * ref, rtol=1e-12, atol=1e-12)


def test_score_only_vjp_is_not_the_identity():
  """Without the params' gradients d mod / d score is still taken (the defect
  of a param-free multiplicative mod treated as additive)."""
  shape = (1, 3, 2, 2)
  z = jax.random.normal(jax.random.key(2), shape, jnp.float64)
  ds = jnp.ones(shape, jnp.float64)
  mod = _mod()
  _, _, vjp = score_transform.transform(z, None, mod, lambda: _index(shape),
                                        mod_vjp=True, mod_params=False)
  dz, dmod = score_transform.transform_vjp(ds, None, None, vjp, None)
  assert dmod is None
  h = jnp.arange(3, dtype=jnp.float64).reshape(1, 3, 1, 1)
  np.testing.assert_allclose(dz, jnp.broadcast_to(1.3 + 0.5 * h, shape),
                             rtol=1e-14)


def test_mod_cotangent_keeps_the_tree_and_zeros_int_leaves():
  mod = _mod()
  grads = [jnp.float64(3.0), jnp.arange(7.0)]  # gain, table (leaf order)
  ct = score_transform.mod_cotangent(mod, grads)
  assert ct.fn is mod.fn and ct.name == mod.name
  np.testing.assert_array_equal(ct.params['table'], grads[1])
  assert float(ct.params['gain']) == 3.0
  assert ct.params['shift'].dtype == jax.dtypes.float0
  zeros = score_transform.mod_cotangent(mod, None)
  assert float(jnp.abs(zeros.params['table']).sum()) == 0.0
  assert score_transform.mod_cotangent(None, None) is None


def test_softmax_backward_rows():
  rng = np.random.default_rng(0)
  out = rng.standard_normal((2, 3, 4, 5))  # [B, T, N, Hv]
  d_out = rng.standard_normal((2, 3, 4, 5))
  lse = rng.standard_normal((2, 4, 3))
  lse[0, 1, 2] = -np.inf
  d_lse = rng.standard_normal((2, 4, 3))
  delta, safe = score_transform.softmax_backward_rows(
      jnp.asarray(out), jnp.asarray(d_out), jnp.asarray(lse), jnp.asarray(d_lse),
      jnp.float64, jax.lax.Precision.HIGHEST)
  want = np.einsum('btnv,btnv->bnt', d_out, out) - d_lse
  np.testing.assert_allclose(delta, want, rtol=1e-13)
  assert safe[0, 1, 2] == np.inf
  np.testing.assert_array_equal(np.asarray(safe)[np.isfinite(lse)],
                                lse[np.isfinite(lse)])
