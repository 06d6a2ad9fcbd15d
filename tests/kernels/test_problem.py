"""Tests of the implementation contract (kernels/problem.py) on the float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from kernels import problem as problem_lib
from kernels import reference


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape))


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _np_fmix32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> np.uint32(16))


def _np_bits(seed, b, h, q, kv):
  """NumPy transcription of the documented counter-based hash."""
  with np.errstate(over='ignore'):
    x = _np_fmix32(np.uint32(seed[0]) ^ np.uint32(0x9E3779B9))
    for i, v in enumerate((seed[1], b, h, q, kv)):
      x = _np_fmix32(x ^ (np.asarray(v).astype(np.uint32) +
                          np.uint32((0x7F4A7C15 * (i + 1)) & 0xFFFFFFFF)))
  return x


def test_dropout_bits_match_numpy_transcription():
  seed = jnp.asarray([12345, 678], jnp.uint32)
  b, h, q, kv = np.meshgrid(np.arange(2), np.arange(3), np.arange(5), np.arange(7),
                            indexing='ij')
  got = np.asarray(problem_lib.dropout_bits(seed, b, h, q, kv))
  want = _np_bits(np.asarray(seed), b, h, q, kv)
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got)) == got.size  # no collisions on a small grid


def test_dropout_keep_rate_and_independence():
  seed = problem_lib.seed_from_key(jax.random.key(3))
  b, h, q, kv = problem_lib.index_grids(2, 4, 64, 64)
  keep = np.asarray(problem_lib.dropout_keep(seed, 0.3, b, h, q, kv))
  assert abs(keep.mean() - 0.7) < 0.01
  # Neighbouring positions are not correlated.
  agree = (keep[..., 1:] == keep[..., :-1]).mean()
  assert abs(agree - (0.7 ** 2 + 0.3 ** 2)) < 0.02
  other = np.asarray(problem_lib.dropout_keep(
      problem_lib.seed_from_key(jax.random.key(4)), 0.3, b, h, q, kv))
  assert abs((keep == other).mean() - 0.58) < 0.02


def _reference_dropout(q, k, v, rate, seed, mask=None):
  """Dense float64 dropout attention written from the definition."""
  b, t, n, hd = q.shape
  logits = np.einsum('btnh,bsnh->bnts', np.asarray(q), np.asarray(k)) / np.sqrt(hd)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  bi, hi, qi, ki = np.meshgrid(np.arange(b), np.arange(n), np.arange(t),
                               np.arange(k.shape[1]), indexing='ij')
  keep = _np_bits(np.asarray(seed), bi, hi, qi, ki) >= np.uint32(
      problem_lib.dropout_threshold(rate))
  p = p * keep / (1 - rate)
  return np.einsum('bnts,bsnh->btnh', p, np.asarray(v))


def test_reference_dropout_equals_dense_definition():
  rng = np.random.default_rng(0)
  q, k, v = (_rand(rng, 2, 12, 3, 8) for _ in range(3))
  key = jax.random.key(7)
  got = attention.dot_product_attention(q, k, v, dropout_rate=0.25, dropout_key=key,
                                        implementation='reference')
  causal = np.tril(np.ones((12, 12), bool))
  want = _reference_dropout(q, k, v, 0.25, problem_lib.seed_from_key(key))
  np.testing.assert_allclose(got, want, atol=1e-12)
  got = attention.dot_product_attention(q, k, v, dropout_rate=0.25, dropout_key=key,
                                        is_causal=True, implementation='reference')
  want = _reference_dropout(q, k, v, 0.25, problem_lib.seed_from_key(key), causal)
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_dropout_expectation_converges_to_no_dropout():
  rng = np.random.default_rng(1)
  q, k, v = (_rand(rng, 1, 8, 2, 4) for _ in range(3))
  plain = attention.dot_product_attention(q, k, v, implementation='reference')

  def one(i):
    return attention.dot_product_attention(
        q, k, v, dropout_rate=0.5, dropout_key=jax.random.fold_in(jax.random.key(0), i),
        implementation='reference')

  mean = jnp.mean(jax.vmap(one)(jnp.arange(2000)), axis=0)
  err = float(jnp.max(jnp.abs(mean - plain)))
  single = float(jnp.max(jnp.abs(one(0) - plain)))
  assert err < 0.1 * single and err < 0.05


def test_dropout_gradients_match_dense_definition():
  rng = np.random.default_rng(2)
  q, k, v = (_rand(rng, 1, 6, 2, 4) for _ in range(3))
  key = jax.random.key(5)
  seed = problem_lib.seed_from_key(key)
  bi, hi, qi, ki = problem_lib.index_grids(1, 2, 6, 6)
  mult = problem_lib.dropout_multiplier(seed, 0.4, bi, hi, qi, ki, jnp.float64)

  def dense(q, k, v):
    p = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, k) / 2.0, axis=-1) * mult
    return jnp.sum(jnp.sin(jnp.einsum('bnts,bsnh->btnh', p, v)))

  def ours(q, k, v):
    return jnp.sum(jnp.sin(attention.dot_product_attention(
        q, k, v, dropout_rate=0.4, dropout_key=key, implementation='reference')))

  for got, want in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(q, k, v),
                       jax.jit(jax.grad(dense, (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_score_mod_closure_gets_table_gradient_and_matches_bias():
  rng = np.random.default_rng(3)
  q, k, v = (_rand(rng, 2, 10, 4, 8) for _ in range(3))
  table = _rand(rng, 19)
  dist = np.arange(10)[:, None] - np.arange(10)[None, :] + 9

  def with_mod(table):
    return attention.dot_product_attention(
        q, k, v, score_mod=lambda s, b, h, qi, ki: s + table[qi - ki + 9],
        is_causal=True, implementation='reference')

  def with_bias(table):
    return attention.dot_product_attention(
        q, k, v, bias=table[dist][None, None], is_causal=True,
        implementation='reference')

  np.testing.assert_allclose(with_mod(table), with_bias(table), atol=1e-12)
  g1 = jax.jit(jax.grad(lambda t: jnp.sum(jnp.cos(with_mod(t)))))(table)
  g2 = jax.jit(jax.grad(lambda t: jnp.sum(jnp.cos(with_bias(t)))))(table)
  np.testing.assert_allclose(g1, g2, atol=1e-12)
  assert float(jnp.abs(g1).sum()) > 0


def test_score_mod_table_is_traced_not_recompiled():
  rng = np.random.default_rng(4)
  q, k, v = (_rand(rng, 1, 8, 2, 4) for _ in range(3))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(table):
    return attention.dot_product_attention(
        q, k, v, score_mod=lambda s, b, h, qi, ki: s * table[h],
        implementation='reference')

  a = run(jnp.asarray(np.ones(2)))
  b = run(jnp.asarray(np.full(2, 2.0)))
  assert not np.allclose(a, b)


def test_score_mod_runs_after_soft_cap_before_mask():
  rng = np.random.default_rng(5)
  q, k, v = (_rand(rng, 1, 6, 1, 4) * 3 for _ in range(3))
  # A mod that makes every logit huge: the mask must still hide the future.
  out = attention.dot_product_attention(
      q, k, v, is_causal=True, logits_soft_cap=2.0,
      score_mod=lambda s, b, h, qi, ki: s + 100.0, implementation='reference')
  want = attention.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=2.0,
                                         implementation='reference')
  np.testing.assert_allclose(out, want, atol=1e-12)
  # The mod sees capped logits (|score| <= cap): hiding larger ones changes nothing.
  seen_capped = attention.dot_product_attention(
      q, k, v, is_causal=True, logits_soft_cap=2.0, implementation='reference',
      score_mod=lambda s, b, h, qi, ki: jnp.where(jnp.abs(s) <= 2.0, s, -jnp.inf))
  np.testing.assert_allclose(seen_capped, want, atol=1e-12)
  uncapped = attention.dot_product_attention(
      q, k, v, is_causal=True, implementation='reference',
      score_mod=lambda s, b, h, qi, ki: jnp.where(jnp.abs(s) <= 2.0, s, -jnp.inf))
  assert not np.allclose(uncapped, want)


def test_rows_hidden_by_score_mod_are_zero():
  rng = np.random.default_rng(6)
  q, k, v = (_rand(rng, 1, 6, 2, 4) for _ in range(3))

  def mod(s, b, h, qi, ki):
    return jnp.where(qi == 2, -jnp.inf, s)

  def loss(q, k, v):
    return jnp.sum(attention.dot_product_attention(q, k, v, score_mod=mod,
                                                   implementation='reference'))

  out = attention.dot_product_attention(q, k, v, score_mod=mod,
                                        implementation='reference')
  assert np.all(np.asarray(out[:, 2]) == 0)
  for g in jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v):
    assert np.all(np.isfinite(g))


def test_problem_is_a_pytree_with_static_key():
  rng = np.random.default_rng(7)
  q = _rand(rng, 1, 4, 2, 4)
  mod = problem_lib.ScoreMod(fn=lambda p, s, b, h, qi, ki: s + p['w'][0],
                             params={'w': jnp.ones(3)}, name='w')
  p1 = problem_lib.make_problem(q, q, q, bias=jnp.zeros((1, 1, 4, 4)), score_mod=mod,
                                mask=masks.causal(4, 4))
  leaves, tree = jax.tree_util.tree_flatten(p1)
  assert len(leaves) == 2  # bias and the mod's table
  p2 = jax.tree_util.tree_unflatten(tree, leaves)
  assert p2.static_key == p1.static_key
  hash(p1)
  out = jax.jit(lambda p: reference.attention(q, q, q, p))(p1)
  assert out.shape == (1, 4, 2, 4)


@pytest.mark.parametrize('shape_q, shape_k, name', [
    ((0, 4, 2, 4), (0, 4, 2, 4), 'query batch'),
    ((1, 0, 2, 4), (1, 4, 2, 4), 'query length'),
    ((1, 4, 2, 4), (1, 0, 2, 4), 'key length'),
    ((1, 4, 2, 0), (1, 4, 2, 0), 'query head_dim'),
    ((1, 4, 0, 4), (1, 4, 2, 4), 'query heads'),
])
def test_empty_dimensions_are_named_errors(shape_q, shape_k, name):
  q, k = jnp.zeros(shape_q), jnp.zeros(shape_k)
  with pytest.raises(ValueError, match=name.split()[1]):
    attention.dot_product_attention(q, k, k, implementation='reference')


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(dropout_rate=1.0, dropout_key=jax.random.key(0)), ValueError, 'dropout_rate'),
    (dict(dropout_rate=-0.1, dropout_key=jax.random.key(0)), ValueError, 'dropout_rate'),
    (dict(dropout_rate='0.1'), TypeError, 'dropout_rate'),
    (dict(dropout_rate=0.1), ValueError, 'dropout_key'),
    (dict(dropout_rate=0.1, dropout_key=jnp.zeros(2, jnp.int32)), TypeError,
     'dropout_key'),
    (dict(score_mod=3), TypeError, 'score_mod'),
    (dict(score_mod=lambda s, b, h, q, kv: jnp.stack([s, s])), ValueError,
     'score_mod'),
    (dict(score_mod=lambda s, b: s), TypeError, 'score_mod'),
    (dict(score_mod=problem_lib.ScoreMod(
        fn=lambda p, s, b, h, qi, ki: jnp.sum(s))), ValueError, 'score_mod'),
    (dict(mask=(masks.causal(4, 4), jnp.ones((1, 1, 4, 4), jnp.int32))), TypeError,
     r'mask\[1\]'),
])
def test_bad_arguments(kwargs, error, match):
  q = jnp.zeros((1, 4, 2, 4))
  with pytest.raises(error, match=match):
    attention.dot_product_attention(q, q, q, implementation='reference', **kwargs)


def test_mask_tuple_is_a_conjunction():
  rng = np.random.default_rng(8)
  q, k, v = (_rand(rng, 1, 8, 2, 4) for _ in range(3))
  dense = jnp.asarray(rng.random((1, 2, 8, 8)) < 0.7)
  got = attention.dot_product_attention(q, k, v, mask=(masks.causal(8, 8), dense),
                                        implementation='reference')
  want = attention.dot_product_attention(
      q, k, v, mask=dense & jnp.tril(jnp.ones((8, 8), bool)),
      implementation='reference')
  np.testing.assert_allclose(got, want, atol=1e-12)


def test_nan_query_propagates():
  rng = np.random.default_rng(9)
  q, k, v = (_rand(rng, 1, 4, 1, 4) for _ in range(3))
  q = q.at[0, 1].set(jnp.nan)
  out = attention.dot_product_attention(q, k, v, implementation='reference')
  assert np.all(np.isnan(np.asarray(out[0, 1])))
  assert np.all(np.isfinite(np.asarray(out[0, [0, 2, 3]])))


@pytest.mark.parametrize('module', ['kernels', 'kernels.problem', 'kernels.reference',
                                    'attention.score_mods', 'attention.api',
                                    'kernels.xla'])
def test_each_module_imports_first(module):
  """kernels.problem and the attention package import each other: no cycle error."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (f'import {module}; import attention, kernels; '
          'print(attention.ScoreMod is kernels.ScoreMod, kernels.AttentionProblem)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=False, env={'JAX_PLATFORMS': 'cpu',
                                            'PATH': '/usr/bin:/bin'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('True')
