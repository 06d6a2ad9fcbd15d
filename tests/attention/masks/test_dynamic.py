"""DynamicBlockMask and its constructors against brute-force NumPy selections."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from attention.masks import dynamic


def _lists(m: dynamic.DynamicBlockMask):
  return np.asarray(m.kv_indices), np.asarray(m.kv_counts)


def _check_format(m: dynamic.DynamicBlockMask, want_blocks: np.ndarray):
  """Ascending lists, padding repeats the last active block (0 if none)."""
  idx, cnt = _lists(m)
  assert idx.dtype == np.int32 and cnt.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(m.block_matrix()), want_blocks)
  for pos in np.ndindex(*cnt.shape):
    row, c = idx[pos], cnt[pos]
    want = np.nonzero(want_blocks[pos])[0]
    assert c == len(want)
    np.testing.assert_array_equal(row[:c], want)
    np.testing.assert_array_equal(row[c:], want[-1] if c else 0)


def _brute_top_k(scores, k, always):
  """Per row: always-blocks first, then descending score, ties -> lower index."""
  out = np.zeros(scores.shape, bool)
  for pos in np.ndindex(*scores.shape[:-1]):
    row = scores[pos]
    keep = list(np.nonzero(always[pos])[0]) if always is not None else []
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    for j in order:
      if len(keep) >= k:
        break
      if j not in keep and np.isfinite(row[j]):
        keep.append(j)
    out[pos][keep[:k]] = True
  return out


def _geometry(t=64, s=64, bq=16, bk=16):
  return dict(q_len=t, kv_len=s, block_q=bq, block_kv=bk)


def test_top_k_equals_brute_force_with_ties_and_ineligible():
  rng = np.random.default_rng(0)
  nq = nk = 6
  scores = rng.integers(0, 3, size=(2, 3, nq, nk)).astype(np.float32)  # many ties
  causal = np.tril(np.ones((nq, nk), bool))
  scores = np.where(causal, scores, -np.inf)
  always = np.broadcast_to(np.eye(nq, dtype=bool), scores.shape)
  for k in (1, 2, 4, 6):
    m = masks.top_k_blocks(jnp.asarray(scores), k, always=jnp.asarray(always),
                           **_geometry(96, 96, 16, 16))
    assert m.budget == k
    _check_format(m, _brute_top_k(scores, k, always))


def test_top_k_nan_scores_are_never_chosen():
  scores = jnp.asarray([[[[jnp.nan, 1.0, 0.5, jnp.nan]]]])
  m = masks.top_k_blocks(scores, 3, **_geometry(16, 64, 16, 16))
  _check_format(m, np.asarray([[[[False, True, True, False]]]]))


def _brute_cumulative(mass, tau, budget, always):
  out = np.zeros(mass.shape, bool)
  for pos in np.ndindex(*mass.shape[:-1]):
    row = np.where(np.isfinite(mass[pos]) & (mass[pos] > 0), mass[pos], 0.0)
    total = row.sum()
    keep = list(np.nonzero(always[pos])[0]) if always is not None else []
    got = row[keep].sum()
    for j in sorted(range(len(row)), key=lambda j: (-row[j], j)):
      if len(keep) >= budget or got >= tau * total:
        break
      if j in keep or row[j] <= 0:
        continue
      keep.append(j)
      got += row[j]
    out[pos][keep[:budget]] = True
  return out


@pytest.mark.parametrize('tau,budget', [(0.3, 5), (0.8, 5), (1.0, 3), (0.9, 6)])
def test_cumulative_threshold_equals_brute_force(tau, budget):
  rng = np.random.default_rng(1)
  mass = rng.random((2, 2, 4, 6)).astype(np.float32)
  mass[0, 0, 1] = 0.0  # a row with no mass at all
  mass[1, 1, :, 2] = 0.0
  always = np.zeros(mass.shape, bool)
  always[..., 0, 0] = True
  m = masks.cumulative_threshold_blocks(
      jnp.asarray(mass), tau, budget, always=jnp.asarray(always),
      **_geometry(64, 96, 16, 16))
  _check_format(m, _brute_cumulative(mass, tau, budget, always))


def test_from_block_matrix_union_transpose_and_density():
  rng = np.random.default_rng(2)
  blocks = rng.random((2, 1, 4, 5)) < 0.4
  blocks[0, 0, 2] = False  # a q block that sees nothing
  m = masks.from_block_matrix(jnp.asarray(blocks), **_geometry(64, 80, 16, 16))
  _check_format(m, blocks)
  q_idx, q_cnt = m.transpose()
  t = dynamic.DynamicBlockMask(q_idx, q_cnt, 80, 64, 16, 16)  # lists per kv block
  _check_format(t, np.swapaxes(blocks, -1, -2))
  np.testing.assert_allclose(np.asarray(m.density()), blocks.mean(axis=(2, 3)))
  # Union with a static sink column + local band at block granularity.
  static = masks.sink_window(64, 1, 8, kv_len=80)
  extra = masks.compile_mask(static, 16, 16).block_state[0] != 0
  u = masks.union(m, static)
  _check_format(u, blocks | extra[None, None])
  assert u.budget <= 5


def test_materialize_equals_blocks_and_inner_mask():
  rng = np.random.default_rng(3)
  blocks = rng.random((1, 2, 3, 3)) < 0.6
  inner = masks.causal(40, 40)
  m = masks.from_block_matrix(jnp.asarray(blocks), q_len=40, kv_len=40, block_q=16,
                              block_kv=16, inner=inner)
  dense = np.asarray(m.materialize(num_heads=4))  # [1, 4, 40, 40]
  want = np.zeros((1, 4, 40, 40), bool)
  for n in range(4):
    for i in range(40):
      for j in range(40):
        want[0, n, i, j] = blocks[0, n // 2, i // 16, j // 16] and j <= i
  np.testing.assert_array_equal(dense, want)


def test_from_mask_means_the_static_mask():
  mask = masks.sliding_window(50, 12)
  m = masks.dynamic_from_mask(mask, 16, 16)
  np.testing.assert_array_equal(np.asarray(m.materialize())[0, 0],
                                mask.materialize())


def test_attention_with_dynamic_mask_equals_dense_mask_and_grads():
  key = jax.random.PRNGKey(0)
  b, t, n, kh, h = 2, 48, 4, 2, 8
  q = jax.random.normal(key, (b, t, n, h), jnp.float32)
  k = jax.random.normal(jax.random.fold_in(key, 1), (b, t, kh, h), jnp.float32)
  v = jax.random.normal(jax.random.fold_in(key, 2), (b, t, kh, h), jnp.float32)
  scores = jax.random.normal(jax.random.fold_in(key, 3), (b, kh, 3, 3))
  scores = jnp.where(jnp.tril(jnp.ones((3, 3), bool)), scores, -jnp.inf)
  m = masks.top_k_blocks(scores, 2, always=jnp.eye(3, dtype=bool),
                         **_geometry(t, t, 16, 16))
  dense = m.materialize(n) & jnp.tril(jnp.ones((t, t), bool))

  def f(mask, q, k, v):
    return attention.dot_product_attention(
        q, k, v, mask=mask, is_causal=isinstance(mask, dynamic.DynamicBlockMask),
        implementation='reference')

  np.testing.assert_allclose(f(m, q, k, v), f(dense, q, k, v), atol=1e-6)
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(f(m, *a) ** 2), argnums=(0, 1, 2)))(
      q, k, v)
  g2 = jax.jit(jax.grad(lambda *a: jnp.sum(f(dense, *a) ** 2), argnums=(0, 1, 2)))(
      q, k, v)
  for a, c in zip(g1, g2):
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_no_retrace_when_only_the_lists_change():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def route(scores):
    return masks.top_k_blocks(scores, 2, **_geometry(64, 64, 16, 16))

  chex.clear_trace_counter()
  for seed in range(3):
    s = jax.random.normal(jax.random.PRNGKey(seed), (1, 1, 4, 4))
    m = route(s)
    assert m.kv_indices.shape == (1, 1, 4, 2)


def test_problem_folds_the_static_mask_into_inner():
  q = jnp.zeros((1, 32, 2, 8))
  m = masks.from_block_matrix(jnp.ones((1, 1, 2, 2), bool), **_geometry(32, 32))
  p = attention.make_problem(q, q, q, mask=m, is_causal=True)
  assert p.mask_obj is None and p.block_mask.inner == masks.causal(32, 32)
  assert hash(p) == hash(attention.make_problem(q, q, q, mask=m, is_causal=True))


@pytest.mark.parametrize('fn,kwargs,match', [
    (masks.top_k_blocks, dict(k=0), 'k must be in'),
    (masks.top_k_blocks, dict(k=5), 'k must be in'),
    (masks.cumulative_threshold_blocks, dict(threshold=0.5, budget=0), 'budget'),
    (masks.cumulative_threshold_blocks, dict(threshold=1.5, budget=2), 'threshold'),
])
def test_bad_budgets(fn, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fn(jnp.zeros((1, 1, 4, 4)), **kwargs, **_geometry())


def test_bad_shapes_and_geometry():
  with pytest.raises(ValueError, match=r'scores must have shape \[B, H, nq, nk\]'):
    masks.top_k_blocks(jnp.zeros((1, 1, 4, 3)), 2, **_geometry())
  with pytest.raises(ValueError, match='scores must have shape'):
    masks.top_k_blocks(jnp.zeros((4, 4)), 2, **_geometry())
  with pytest.raises(TypeError, match='blocks must have dtype bool'):
    masks.from_block_matrix(jnp.zeros((1, 1, 4, 4)), **_geometry())
  with pytest.raises(ValueError, match='budget must be at least'):
    masks.from_block_matrix(jnp.ones((1, 1, 4, 4), bool), budget=2, **_geometry())
  with pytest.raises(ValueError, match='block_q must be a positive int'):
    masks.top_k_blocks(jnp.zeros((1, 1, 4, 4)), 2, q_len=64, kv_len=64, block_q=0,
                       block_kv=16)
  with pytest.raises(ValueError, match='inner must have shape'):
    masks.top_k_blocks(jnp.zeros((1, 1, 4, 4)), 2, inner=masks.causal(32, 32),
                       **_geometry())
  m = masks.from_block_matrix(jnp.ones((3, 1, 4, 4), bool), **_geometry())
  q = jnp.zeros((2, 64, 2, 8))
  with pytest.raises(ValueError, match='batch must be 1 or 2'):
    attention.dot_product_attention(q, q, q, mask=m)
  m = masks.from_block_matrix(jnp.ones((1, 3, 4, 4), bool), **_geometry())
  with pytest.raises(ValueError, match='heads must divide the query heads'):
    attention.dot_product_attention(q, q, q, mask=m)
  m = masks.from_block_matrix(jnp.ones((1, 1, 2, 2), bool), **_geometry(32, 32))
  with pytest.raises(ValueError, match=r'lengths \(T, S\) = \(64, 64\)'):
    attention.dot_product_attention(q, q, q, mask=m)
  m = masks.from_block_matrix(jnp.ones((1, 1, 4, 4), bool), **_geometry())
  with pytest.raises(ValueError, match='at most one DynamicBlockMask'):
    attention.make_problem(q, q, q, mask=(m, m))
