"""AnchorAttention's anchors and stripes vs NumPy loops over the paper's steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.routing import anchor_attention as an
from tests import oracles

T, G, U, INIT, THETA = 16, 4, 2, 2, 0.6
SEL = dict(group_size=G, sub_block=U, num_init=INIT, theta=THETA)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _qkv(seed, b=2, n=2, kh=1, h=4):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, T, m, h))) for m in (n, kh, kh))


def numpy_selection(q, k):
  """visible [B, N, T, S] by loops: anchors, sub-block means, stripe test, union."""
  q, k = np.asarray(q), np.asarray(k)
  b, t, n, h = q.shape
  k = np.repeat(k, n // k.shape[2], axis=2)
  c = 1 / np.sqrt(h)
  vis = np.zeros((b, n, t, t), bool)
  for bi in range(b):
    for ni in range(n):
      anchor = np.zeros(t)
      for i in range(t):
        keys = [j for j in range(i + 1) if j < INIT or j // G == i // G]
        anchor[i] = max(q[bi, i, ni] @ k[bi, j, ni] * c for j in keys)
      for g in range(t // G):
        stripes = set()
        for u in range(G // U):
          rows = range(g * G + u * U, g * G + (u + 1) * U)
          qm = np.mean([q[bi, i, ni] for i in rows], 0)
          am = np.mean([anchor[i] for i in rows])
          for j in range(INIT, g * G):
            if qm @ k[bi, j, ni] * c + THETA >= am:
              stripes.add(j)
        for i in range(g * G, (g + 1) * G):
          for j in range(i + 1):
            vis[bi, ni, i, j] = j < INIT or j // G == g or j in stripes
  return vis


def test_selection_equals_loops_token_and_block_granular():
  q, k, _ = _qkv(0)
  want = numpy_selection(q, k)
  mask = an.anchor_mask(q, k, **SEL)
  assert mask.block_q == G and mask.block_kv == 1
  got = np.asarray(mask.materialize(2))
  np.testing.assert_array_equal(got, want)
  assert 0 < want.sum() < np.tril(np.ones((T, T))).sum() * 4  # some stripes, sparse
  coarse = np.asarray(an.anchor_mask(q, k, **SEL, block_kv=4).block_matrix())
  per_group = want.reshape(2, 2, T // G, G, T // 4, 4).any((3, 5))
  np.testing.assert_array_equal(coarse, per_group)


def test_attention_equals_dense_reference_forward_and_grads():
  q, k, v = _qkv(1)
  dense = numpy_selection(q, k)
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=dense)
  fn = lambda q, k, v: an.anchor_attention(q, k, v, implementation='reference', **SEL)
  np.testing.assert_allclose(fn(q, k, v), want, atol=1e-10)
  np.testing.assert_allclose(an.anchor_attention(q, k, v, **SEL), want, atol=1e-10)
  dout = jnp.asarray(np.random.default_rng(2).normal(size=want.shape))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * dout), argnums=(0, 1, 2)))(
      q, k, v)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=0.5, mask=dense)
  for g, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(g, ref[name], atol=1e-10, err_msg=name)


def test_bad_input_names_the_argument():
  q, k, _ = _qkv(3)
  with pytest.raises(ValueError, match=r'group_size \(5\) must divide'):
    an.anchor_mask(q, k, **{**SEL, 'group_size': 5})
  with pytest.raises(ValueError, match=r'sub_block \(3\) must divide'):
    an.anchor_mask(q, k, **{**SEL, 'sub_block': 3})
  with pytest.raises(ValueError, match='block_kv must be an int >= 1'):
    an.anchor_mask(q, k, **SEL, block_kv=0)
  with pytest.raises(ValueError, match='key must have shape'):
    an.anchor_mask(q, k[:, :8], **SEL)
  with pytest.raises(TypeError, match='theta must be a float'):
    an.anchor_mask(q, k, **{**SEL, 'theta': None})
