"""CrossFormer cross-scale embedding and SDA / LDA layer vs direct loops."""

from flax import nnx
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from attention.variants import crossformer as cf


def _conv_loops(x, w, b, stride):
  """Strided conv, padding floor((k - s) / 2) before, the rest after (NumPy)."""
  k = w.shape[0]
  lo = (k - stride) // 2
  hi = k - stride - lo
  xp = np.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  bsz, h, wd, _ = x.shape
  out = np.zeros((bsz, h // stride, wd // stride, w.shape[3]))
  for i in range(h // stride):
    for j in range(wd // stride):
      patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k]  # [B,k,k,C]
      out[:, i, j] = np.einsum('bxyc,xyco->bo', patch, w) + b
  return out


@pytest.mark.parametrize('kernels,stride', [((4, 8), 4), ((2, 4), 1)])
def test_cross_scale_embedding_equals_loops(kernels, stride):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 3))
  dims = cf.cel_dims(8, len(kernels))
  ws = [rng.normal(size=(k, k, 3, d)) for k, d in zip(kernels, dims)]
  bs = [rng.normal(size=(d,)) for d in dims]
  ref = np.concatenate([_conv_loops(x, w, b, stride) for w, b in zip(ws, bs)], -1)
  with jax.enable_x64(True):
    f = lambda x_, *wb: cf.cross_scale_embedding(
        x_, wb[:len(ws)], wb[len(ws):], stride=stride)
    args = [jnp.asarray(a) for a in [x] + ws + bs]
    out = f(*args)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-11, atol=1e-11)
    if stride == 4:
      jtu.check_grads(f, args, order=1, modes=['rev'])


def test_cel_dims_and_bad_input():
  assert cf.cel_dims(64, 4) == (32, 16, 8, 8) and cf.cel_dims(8, 1) == (8,)
  with pytest.raises(ValueError, match='dim'):
    cf.cel_dims(12, 4)
  x = jnp.ones((1, 8, 8, 2))
  with pytest.raises(ValueError, match='stride'):
    cf.cross_scale_embedding(x, [jnp.ones((2, 2, 2, 4))], [jnp.ones((4,))], stride=3)
  with pytest.raises(ValueError, match='kernels'):
    cf.cross_scale_embedding(x, [jnp.ones((2, 2, 2, 4))], [jnp.ones((4,))], stride=4)
  with pytest.raises(ValueError, match='biases'):
    cf.cross_scale_embedding(x, [jnp.ones((4, 4, 2, 4))], [jnp.ones((3,))], stride=4)
  with pytest.raises(ValueError, match='grid'):
    cf.CrossFormerAttention(8, 2, 4, grid=(16,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='size'):
    cf.CrossFormerAttention(8, 2, 4, grid=(4, 4), size=3, rngs=nnx.Rngs(0))


def test_crossformer_attention_sda_lda_groups():
  """The layer equals dense attention over the brute-force SDA / LDA groups."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 16, 8))
  ii, jj = np.divmod(np.arange(16), 4)
  for layer_index in (0, 1):
    layer = cf.CrossFormerAttention(8, 2, 4, grid=(4, 4), layer_index=layer_index,
                                    implementation='reference', rngs=nnx.Rngs(0))
    assert (layer.embed is not None) == (layer_index == 0)
    if layer_index % 2:  # LDA, interval 2.
      gid = (ii % 2) * 2 + jj % 2
    else:  # SDA, groups of 2 x 2.
      gid = (ii // 2) * 2 + jj // 2
    allowed = gid[:, None] == gid[None, :]
    with jax.enable_x64(True):
      xx = jnp.asarray(x)
      h = xx
      if layer.embed is not None:
        h = layer.embed(xx.reshape(2, 4, 4, 8)).reshape(2, 16, 8)
      w = lambda p: np.asarray(p[...], np.float64)
      h = np.asarray(h)
      q, k, v = (np.einsum('btd,dnh->btnh', h, w(p))
                 for p in (layer.wq, layer.wk, layer.wv))
      s = np.where(allowed, np.einsum('btnh,bsnh->bnts', q, k) / 2.0, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      ref = np.einsum('btnh,nhd->btd', np.einsum('bnts,bsnh->btnh', p, v),
                      w(layer.wo))
      out = layer(xx)
      np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
