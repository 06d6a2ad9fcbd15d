"""DaViT channel group attention and window attention vs direct float64 loops."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from attention.variants import channel_attention as ca


def _channel_loops(q, k, v):
  """Eq. 3 per batch and group: out^T = softmax(Q_g^T K_g / sqrt(C_g)) V_g^T."""
  b, t, n, c = q.shape
  rep = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for g in range(n):
      qg, kg, vg = q[bi, :, g], k[bi, :, g // rep], v[bi, :, g // rep]  # [T, C]
      a = qg.T @ kg / np.sqrt(c)  # [C, C]
      a = np.exp(a - a.max(1, keepdims=True))
      a /= a.sum(1, keepdims=True)
      out[bi, :, g] = (a @ vg.T).T
  return out


@pytest.mark.parametrize('kv_heads', [2, 1])
def test_channel_group_attention_equals_loops(kv_heads):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 6, 2, 4))
  k, v = rng.normal(size=(2, 2, 6, kv_heads, 4))
  with jax.enable_x64(True):
    out = ca.channel_group_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(out), _channel_loops(q, k, v),
                               rtol=1e-12, atol=1e-12)
    f = lambda q_, k_, v_: ca.channel_group_attention(q_, k_, v_)
    jtu.check_grads(f, (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)),
                    order=1, modes=['rev'])


def test_window_attention_equals_masked_softmax():
  rng = np.random.default_rng(1)
  grid, w = (4, 6), (2, 3)
  q, k, v = rng.normal(size=(3, 1, 24, 2, 4))
  ii, jj = np.divmod(np.arange(24), 6)
  win = (ii // 2) * 2 + jj // 3
  allowed = win[:, None] == win[None, :]
  s = np.einsum('btnh,bsnh->bnts', q, k) / 2.0
  s = np.where(allowed, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum('bnts,bsnh->btnh', p, v)
  with jax.enable_x64(True):
    out = ca.window_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              grid=grid, window=w, implementation='xla')
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10, atol=1e-10)
  assert ca.default_window((4, 4)) == (2, 2) and ca.default_window((14, 7)) == (7, 1)


def test_davit_layer_alternates_and_bad_input():
  from flax import nnx
  kinds = [type(ca.davit_layer(8, 2, 4, grid=(4, 4), layer_index=i,
                               rngs=nnx.Rngs(0))).__name__ for i in range(3)]
  assert kinds == ['WindowAttention', 'ChannelAttention', 'WindowAttention']
  q = jnp.ones((1, 4, 2, 4))
  with pytest.raises(ValueError, match='value'):
    ca.channel_group_attention(q, q, jnp.ones((1, 4, 2, 3)))
  with pytest.raises(ValueError, match='key'):
    ca.channel_group_attention(q, jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 2, 4)))
  with pytest.raises(ValueError, match='scale'):
    ca.channel_group_attention(q, q, q, scale=-1.0)
  with pytest.raises(ValueError, match='grid'):
    ca.window_attention(q, q, q, grid=(3, 3), window=1)
  with pytest.raises(ValueError, match='block'):
    ca.WindowAttention(8, 2, 4, grid=(4, 4), window=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='layer_index'):
    ca.davit_layer(8, 2, 4, grid=(4, 4), layer_index=-1, rngs=nnx.Rngs(0))
  big = jnp.full((1, 4, 1, 2), 1e4)
  assert np.all(np.isfinite(np.asarray(ca.channel_group_attention(big, big, big))))
