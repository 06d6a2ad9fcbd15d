"""attend with no interventions equals dot_product_attention; records vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import interventions as ivs
from tests.attention.interventions import numpy_oracle as npo


def _qkv(seed, b, t, s, n, kh, h=8, hv=8):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, kh, h)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, s, kh, hv)), jnp.float32))


def _site(case, b, t, s):
  """(site, numpy visibility) for a named visibility case."""
  kv_valid = np.ones((b, s), bool)
  window = None
  q_pos = np.broadcast_to(np.arange(s - t, s), (b, t)).copy()
  kv_pos = np.broadcast_to(np.arange(s), (b, s)).copy()
  if case == 'window':
    window = 4
  if case == 'padded':  # left padding of 3 / 0 tokens; positions count real tokens
    kv_valid[0, :3] = False
    kv_pos[0] = np.arange(s) - 3
    q_pos[0] = kv_pos[0, s - t:]
  site = ivs.AttentionSite(
      layer=0, num_layers=2, q_positions=jnp.asarray(q_pos, jnp.int32),
      kv_positions=jnp.asarray(kv_pos, jnp.int32), kv_valid=jnp.asarray(kv_valid),
      window=window, scale=0.35)
  return site, npo.visible(q_pos, kv_pos, kv_valid, window)


CASES = [  # (case, B, T, S, N, K); GQA (N > K) throughout
    ('causal', 2, 12, 12, 4, 2),
    ('window', 2, 12, 12, 4, 2),
    ('padded', 2, 12, 12, 4, 2),
    ('cache', 2, 1, 16, 4, 1),  # one decode query at position 15 vs a 16-key cache
]
_reference = jax.jit(lambda q, k, v, mask, scale: attention.dot_product_attention(
    q, k, v, mask=mask, scale=scale, implementation='reference'),
                     static_argnums=4)


@pytest.mark.parametrize('case,b,t,s,n,kh', CASES)
def test_attend_equals_dot_product_attention(case, b, t, s, n, kh):
  q, k, v = _qkv(0, b, t, s, n, kh)
  site, vis = _site(case, b, t, s)
  ref = _reference(q, k, v, jnp.asarray(vis), site.scale)
  # The blocked path on the visibility cases (the plain causal one is their special
  # case; test_blocked covers it with edits).
  methods = ('dense', 'blocked') if case in ('padded', 'cache') else ('dense',)
  for method in methods:
    out, rec = ivs.attend(q, k, v, site, (), None, method=method)
    assert rec == {}
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5, err_msg=method)
  np_out, _, _ = npo.attention(q, k, v, vis, site.scale)
  np.testing.assert_allclose(out, np_out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('case,b,t,s,n,kh', CASES[2:])
def test_records_equal_numpy_float64_softmax(case, b, t, s, n, kh):
  q, k, v = _qkv(1, b, t, s, n, kh)
  hidden = jnp.asarray(np.random.default_rng(2).normal(size=(b, t, 6)), jnp.float32)
  site, vis = _site(case, b, t, s)
  site = site.replace(hidden=hidden, layer=1)
  record = ivs.Record(layers=(1,), probs=True, logits=True, head_outputs=True,
                      hidden=True)
  out, rec = ivs.attend(q, k, v, site, (), record)
  np_out, np_p, np_z = npo.attention(q, k, v, vis, site.scale)
  assert set(rec) == {'probs', 'logits', 'head_outputs', 'hidden'}
  np.testing.assert_allclose(rec['probs'], np_p, atol=1e-6)
  assert np.array_equal(np.isneginf(rec['logits']), np.isneginf(np_z))
  fin = np.isfinite(np_z)
  np.testing.assert_allclose(np.asarray(rec['logits'])[fin], np_z[fin], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(rec['head_outputs'], np_out, atol=2e-5)
  np.testing.assert_array_equal(rec['hidden'], hidden)
  np.testing.assert_array_equal(out, rec['head_outputs'])
  # Not recorded at another layer; blocked records head outputs and hidden only.
  _, none = ivs.attend(q, k, v, site.replace(layer=0), (), record)
  assert none == {}
  _, blk = ivs.attend(q, k, v, site, (), ivs.Record(head_outputs=True),
                      method='blocked')
  np.testing.assert_allclose(blk['head_outputs'], np_out, atol=2e-5)


def test_rows_that_see_nothing_give_zeros_not_nan():
  b, t, n = 1, 6, 2
  q, k, v = _qkv(3, b, t, t, n, n)
  valid = jnp.asarray([[False, False, True, True, False, True]])
  q_valid = jnp.asarray([[True, True, True, False, True, True]])
  site = ivs.AttentionSite.default(b, t, scale=0.5, kv_valid=valid, q_valid=q_valid)
  # (Blocked gradients of such rows: test_act's blocked gradient test.)
  for method in ('dense', 'blocked'):
    out, rec = ivs.attend(q, k, v, site, (),
                          ivs.Record(probs=True) if method == 'dense' else None,
                          method=method)
    assert np.isfinite(np.asarray(out)).all()
    # Queries 0, 1 see no valid key; query 3 is padding.
    np.testing.assert_array_equal(np.asarray(out)[0, [0, 1, 3]], 0.0)
    assert np.abs(np.asarray(out)[0, 2]).sum() > 0
    if method == 'dense':
      np.testing.assert_array_equal(np.asarray(rec['probs'])[0, :, [0, 1, 3]], 0.0)
  grads = jax.jit(jax.grad(lambda q: ivs.attend(q, k, v, site, (),
                                                method='dense')[0].sum()))(q)
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_array_equal(np.asarray(grads)[0, [0, 1, 3]], 0.0)


def test_attend_jits_with_site_and_interventions_as_arguments():
  q, k, v = _qkv(4, 2, 8, 8, 2, 2)
  site, vis = _site('padded', 2, 8, 8)
  fn = jax.jit(ivs.attend, static_argnames=('method',))
  out, rec = fn(q, k, v, site, (), ivs.Record(probs=True), method='dense')
  np_out, np_p, _ = npo.attention(q, k, v, vis, site.scale)
  np.testing.assert_allclose(out, np_out, atol=2e-5)
  np.testing.assert_allclose(rec['probs'], np_p, atol=1e-6)
  leaves, treedef = jax.tree_util.tree_flatten(site)
  assert len(leaves) == 3  # q_positions, kv_positions, kv_valid (hidden None)
  assert jax.tree_util.tree_unflatten(treedef, leaves).window == site.window


def test_bad_input_names_the_argument():
  q, k, v = _qkv(5, 1, 4, 4, 2, 2)
  site = ivs.AttentionSite.default(1, 4, scale=0.5)
  with pytest.raises(ValueError, match='method'):
    ivs.attend(q, k, v, site, method='sparse')
  with pytest.raises(ValueError, match='site.q_positions'):
    ivs.attend(q[:, :3], k, v, site)
  with pytest.raises(ValueError, match='k head_dim'):
    ivs.attend(q, k[..., :4], v, site)
  with pytest.raises(ValueError, match='layer'):
    ivs.AttentionSite.default(1, 4, layer=2, num_layers=2)
  with pytest.raises(ValueError, match='window'):
    ivs.AttentionSite.default(1, 4, window=0)
  with pytest.raises(ValueError, match='record.hidden'):
    ivs.attend(q, k, v, site, (), ivs.Record(hidden=True))
  with pytest.raises(ValueError, match='blocked'):
    ivs.attend(q, k, v, site, (), ivs.Record(probs=True), method='blocked')
  with pytest.raises(TypeError, match='interventions'):
    ivs.attend(q, k, v, site, ('act',))
  with pytest.raises(ValueError, match='heads'):
    ivs.Intervention(heads=(-1,))
  with pytest.raises(ValueError, match='heads must be in'):
    ivs.attend(q, k, v, site, (ivs.Intervention(heads=(2,)),))
  with pytest.raises(ValueError, match='layers must be in'):
    ivs.attend(q, k, v, site, (ivs.Intervention(layers=(1,)),))
