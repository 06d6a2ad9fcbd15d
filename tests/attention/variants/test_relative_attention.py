"""Music Transformer relative attention (skewing), ALiBi / T5 / 2D relative layers.

Oracles: NumPy float64 loops of S_rel[i, j] = q_i . e_{j - i}; a direct quadratic JAX
float64 form that gathers e_{j - i} into [T, T, N, H] (Shaw et al.'s memory layout)
for gradients; the float64 dense softmax of tests.oracles.
"""

from flax import nnx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention import registry
from attention import score_mods
from attention.variants import relative_attention as ra
from experiments import models
from experiments.configs import vit as vit_configs
from tests import oracles


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _loop_rel_logits(q, emb, causal):
  """float64 loops: S[b, n, i, j] = q[b, i, n] . e_{j - i}[n] (row j - i + T - 1)."""
  b, t, n, _ = q.shape
  out = np.zeros((b, n, t, t))
  for bi in range(b):
    for ni in range(n):
      for i in range(t):
        for j in range(t):
          if causal and j > i:
            continue
          out[bi, ni, i, j] = q[bi, i, ni] @ emb[j - i + t - 1, ni]
  return out


def _gathered_rel_logits(q, emb):
  """Direct quadratic form: gather e_{j - i} into [T, T, N, H] (O(L^2 H) memory)."""
  t = q.shape[1]
  idx = np.arange(t)[None, :] - np.arange(t)[:, None] + t - 1  # [T, T]
  idx = np.clip(idx, 0, emb.shape[0] - 1)
  gathered = emb[idx]  # [T, T, N, H]
  return jnp.einsum('binh,ijnh->bnij', q, gathered)


@pytest.mark.parametrize('causal', [True, False])
def test_skewed_equals_gathered_loops(causal):
  rng = np.random.default_rng(0)
  for t in (1, 2, 7):
    q = rng.normal(size=(2, t, 3, 4))
    emb = rng.normal(size=(ra.num_relative_embeddings(t, causal), 3, 4))
    got = ra.relative_logits_skewed(jnp.asarray(q), jnp.asarray(emb), causal=causal)
    np.testing.assert_allclose(np.asarray(got), _loop_rel_logits(q, emb, causal),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize('causal', [True, False])
def test_attention_forward_and_grads(causal):
  """fwd vs the NumPy float64 softmax of (QK^T + S_rel) / sqrt(H); grads wrt q, k, v
  and the embeddings vs the gathered (Shaw-layout) form's autodiff."""
  rng = np.random.default_rng(1)
  b, t, n, kh, h, hv = 2, 6, 4, 2, 4, 3
  q, k = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, t, kh, h))
  v = rng.normal(size=(b, t, kh, hv))
  emb = rng.normal(size=(ra.num_relative_embeddings(t, causal), n, h))
  scale = 1 / np.sqrt(h)
  mask = np.tril(np.ones((t, t), bool)) if causal else None
  want, _ = oracles.numpy_attention(q, k, v, scale=scale, mask=mask,
                                    bias=_loop_rel_logits(q, emb, causal) * scale)
  w = rng.normal(size=(b, t, n, hv))

  def direct(q, k, v, emb):
    logits = (jnp.einsum('btnh,bsnh->bnts', q, jnp.repeat(k, n // kh, axis=2))
              + _gathered_rel_logits(q, emb)) * scale
    if causal:
      logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', p, jnp.repeat(v, n // kh, axis=2))

  args = tuple(jnp.asarray(x) for x in (q, k, v, emb))
  want_grads = jax.jit(jax.grad(lambda *a: jnp.sum(direct(*a) * w),
                                argnums=(0, 1, 2, 3)))(*args)
  fn = lambda impl, *a: ra.music_transformer_attention(*a, causal=causal,
                                                       implementation=impl)
  np.testing.assert_allclose(np.asarray(jax.jit(fn, static_argnums=0)(
      'reference', *args)), want, atol=1e-10)
  out, grads = jax.jit(jax.value_and_grad(
      lambda *a: (jnp.sum(fn('xla', *a) * w), fn('xla', *a)),
      argnums=(0, 1, 2, 3), has_aux=True))(*args)
  np.testing.assert_allclose(np.asarray(out[1]), want, atol=1e-10)
  for name, g, gw in zip('q k v emb'.split(), grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(gw), atol=1e-9,
                               err_msg=f'd{name}')


def _largest_intermediate(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  sizes = [0]

  def walk(jx):
    for eqn in jx.eqns:
      sizes.extend(int(np.prod(o.aval.shape)) for o in eqn.outvars)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return max(sizes)


def test_skewing_memory_is_linear_in_embeddings():
  """No [T, T, H] intermediate forward or backward (the gathered form has one)."""
  t, h = 16, 8
  q = jnp.ones((1, t, 1, h))
  emb = jnp.ones((t, 1, h))
  loss = lambda q, e: jnp.sum(ra.relative_logits_skewed(q, e) ** 2)
  gathered = lambda q, e: jnp.sum(_gathered_rel_logits(q, e) ** 2)
  grad = jax.grad(loss, argnums=(0, 1))
  assert _largest_intermediate(grad, q, emb) <= (t + 1) * t  # the [T, T + 1] pad
  assert _largest_intermediate(gathered, q, emb) >= t * t * h


@pytest.mark.parametrize('causal', [True, False])
def test_embeddings_for_length_clip(causal):
  d, n, h = 3, 2, 2
  table = np.random.default_rng(2).normal(size=(d + 1 if causal else 2 * d + 1, n, h))
  for t in (2, 4, 7):
    got = np.asarray(ra.relative_embeddings_for_length(jnp.asarray(table), t,
                                                       causal=causal))
    dist = np.arange(-(t - 1), 1 if causal else t)  # the rows' distances
    np.testing.assert_array_equal(got, table[np.clip(dist, -d, d) + d])


def test_alibi_variant_equals_dense_bias():
  rng = np.random.default_rng(3)
  b, t, n, kh, h = 1, 8, 4, 2, 4
  q, k = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, t, kh, h))
  v = rng.normal(size=(b, t, kh, h))
  slopes = score_mods.alibi_slopes(n)
  rel = np.arange(t)[None, :] - np.arange(t)[:, None]  # j - i
  fn = registry.get_variant('alibi')
  for causal in (True, False):
    bias = slopes[:, None, None] * (rel if causal else -np.abs(rel))
    want, _ = oracles.numpy_attention(
        q, k, v, scale=h ** -0.5, bias=bias[None],
        mask=np.tril(np.ones((t, t), bool)) if causal else None)
    got, aux = fn(*(jnp.asarray(x) for x in (q, k, v)), mask=None, is_causal=causal,
                  sinks=None, logits_soft_cap=None, implementation='xla')
    assert aux == {}
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_layer_bad_input():
  rngs = nnx.Rngs(0)
  layer = ra.RelativeAttention(16, 2, 8, max_distance=3, rngs=rngs)
  assert layer.rel_embeddings.shape == (4, 2, 8)
  with pytest.raises(ValueError, match='x must have shape'):
    layer(jnp.ones((2, 6, 8)))
  with pytest.raises(ValueError, match='max_distance must be >= 1'):
    ra.RelativeAttention(16, 2, 8, max_distance=0, rngs=rngs)
  with pytest.raises(ValueError, match='max_distance must exceed'):
    ra.T5BiasAttention(16, 2, 8, num_buckets=8, max_distance=2, rngs=rngs)
  with pytest.raises(ValueError, match='grid_hw must be a pair'):
    ra.RelativeBias2DAttention(16, 2, 8, grid=(2, 3, 1), rngs=rngs)


def _train(model, batch_loss, steps=5):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: batch_loss(nnx.merge(graphdef, p, rest)))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return np.asarray(losses)


def _small(config):
  config.model.update(dict(dim=16, depth=1, num_heads=2, num_kv_heads=2, head_dim=8,
                           mlp_dim=32))
  return config


def test_tiny_vit_trains_relative_2d():
  config = _small(vit_configs.get_config('tiny'))
  config.model.attention.variant = 'relative_2d'
  model = models.build_model(config.model, num_classes=4, image_shape=(8, 8, 1))
  layer = model.encoder.blocks[0].attn.layer
  assert layer.grid == (2, 2) and layer.table.shape == (9, 2)
  with pytest.raises(ValueError, match='grid size'):
    layer(jnp.ones((2, 5, 16)))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)))

  def loss(m):
    logits, _ = m(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  with jax.enable_x64(False):
    losses = _train(model, loss)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_bad_input():
  q = jnp.ones((1, 4, 2, 3))
  with pytest.raises(ValueError, match=r'rel_embeddings must have shape \[M, N, H\] = '
                     r'\(4, 2, 3\)'):
    ra.relative_logits_skewed(q, jnp.ones((7, 2, 3)))
  with pytest.raises(ValueError, match=r'rel_embeddings .* \(7, 2, 3\)'):
    ra.relative_logits_skewed(q, jnp.ones((4, 2, 3)), causal=False)
  with pytest.raises(ValueError, match='rel_logits last dim must be 4'):
    ra.skew(jnp.ones((4, 5)))
  with pytest.raises(ValueError, match='query must have rank 4'):
    ra.relative_logits_skewed(jnp.ones((4, 2, 3)), jnp.ones((4, 2, 3)))
  with pytest.raises(ValueError, match='key length'):
    ra.music_transformer_attention(q, jnp.ones((1, 5, 2, 3)), jnp.ones((1, 5, 2, 3)),
                                   jnp.ones((4, 2, 3)))
  with pytest.raises(ValueError, match='table must have an odd number'):
    ra.relative_embeddings_for_length(jnp.ones((4, 2, 3)), 3, causal=False)
  with pytest.raises(ValueError, match='length must be >= 1'):
    ra.relative_embeddings_for_length(jnp.ones((4, 2, 3)), 0)
  with pytest.raises(TypeError, match='causal must be a bool'):
    ra.skew(jnp.ones((4, 4)), causal=1)
