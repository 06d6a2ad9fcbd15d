"""NNX layers of the linear family: projections around the forms, decoding."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import linear
from tests.attention.linear import helpers


def _layers():
  r = lambda: nnx.Rngs(params=0)
  return {
      'linear': linear.LinearAttention(8, 2, 4, rngs=r()),
      'lightning': linear.LightningAttention(8, 2, 4, layer_index=1,
                                             num_layers=3, rngs=r()),
      'retention': linear.Retention(8, 2, 4, rngs=r()),
      'gla_key': linear.GatedLinearAttention(8, 2, 4, rngs=r()),
      'gla_head': linear.GatedLinearAttention(8, 2, 4, per_key=False, rngs=r()),
  }


@pytest.mark.parametrize('name', ['linear', 'lightning', 'retention', 'gla_key',
                                  'gla_head'])
def test_layer_matches_naive_form_and_decodes(name):
  with jax.enable_x64(True):
    layer = _layers()[name]
    x = helpers.rand(np.random.default_rng(0), 2, 11, 8)
    y, state = nnx.jit(lambda m, x: m(x, chunk_size=4, return_state=True))(
        layer, x)
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(x.dtype))
    q, k, v = proj(layer.wq), proj(layer.wk), proj(layer.wv)
    if name == 'linear':
      o, ref_state = linear.naive_linear_attention(q, k, v)
    elif name == 'lightning':
      slopes = linear.lightning_slopes(2, layer_index=1, num_layers=3)
      o, ref_state = linear.naive_lightning_attention(q, k, v, slopes=slopes)
    elif name == 'retention':
      o, ref_state = linear.naive_retention(q, k, v)
    else:
      g = layer.log_gates(x)
      assert g.shape == ((2, 11, 2, 4) if name == 'gla_key' else (2, 11, 2))
      assert bool(jnp.all(g <= 0))
      o, ref_state = linear.naive_gated_linear_attention(q, k, v, g)
    ref = jnp.einsum('btnh,nhd->btd', o, layer.wo[...].astype(x.dtype))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state, ref_state, rtol=1e-6, atol=1e-7)
    # Prefill 7 tokens, then decode the rest one at a time.
    ys, st = [], None
    y0, st = nnx.jit(lambda m, x: m(x, return_state=True))(layer, x[:, :7])
    ys.append(y0)
    step = nnx.jit(lambda m, x, st: m(x, initial_state=st, mode='recurrent',
                                      return_state=True))
    for i in range(7, 11):
      yi, st = step(layer, x[:, i:i + 1], st)
      ys.append(yi)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(st, state, rtol=1e-6, atol=1e-7)


def test_layer_gradients_flow_to_every_parameter_and_bad_arguments():
  layer = linear.GatedLinearAttention(8, 2, 4, rngs=nnx.Rngs(params=0))
  x = jnp.ones((1, 5, 8)) * jnp.arange(8.0) / 8
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  for leaf in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).sum()) > 0
  with pytest.raises(ValueError, match='mode must be one of'):
    layer(x, mode='parallel')
  with pytest.raises(ValueError, match=r'x must have shape \[B, T, 8\]'):
    layer(jnp.ones((1, 5, 7)))
  with pytest.raises(ValueError, match='dim must be a positive int'):
    linear.Retention(0, 2, 4, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match='feature_map must be one of'):
    linear.LinearAttention(8, 2, 4, feature_map='tanh', rngs=nnx.Rngs(params=0))
