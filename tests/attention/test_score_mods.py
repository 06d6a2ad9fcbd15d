"""Tests of `attention.score_mods`.

Oracles: direct float64 NumPy implementations of each paper's equation (brute force over
the indices), a NumPy port of T5's `_relative_position_bucket` (Hugging Face), the
ALiBi paper's slopes, Swin's relative_position_index construction, and for gradients a
dense-bias formulation (the bias [1, N, T, S] materialised from the table with jnp
indexing) through `dot_product_attention(implementation='reference')`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import score_mods
from kernels import problem as problem_lib

B, N, T, S = 2, 4, 9, 11


# ----------------------------------------------------------------------------------------
# NumPy oracles.
# ----------------------------------------------------------------------------------------


def hf_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32,
                                max_distance=128):
  """Hugging Face T5's `_relative_position_bucket`, line by line in NumPy."""
  relative_position = np.asarray(relative_position, np.int64)
  relative_buckets = 0
  if bidirectional:
    num_buckets //= 2
    relative_buckets += (relative_position > 0).astype(np.int64) * num_buckets
    relative_position = np.abs(relative_position)
  else:
    relative_position = -np.minimum(relative_position, np.zeros_like(relative_position))
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  with np.errstate(divide='ignore', invalid='ignore'):
    relative_position_if_large = max_exact + (
        np.log(relative_position.astype(np.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(np.int64)
  relative_position_if_large = np.minimum(
      relative_position_if_large, np.full_like(relative_position_if_large,
                                               num_buckets - 1))
  relative_buckets += np.where(is_small, relative_position, relative_position_if_large)
  return relative_buckets


def swin_relative_position_index(wh, ww):
  """Swin's relative_position_index [Wh*Ww, Wh*Ww] (NumPy port of the paper's code)."""
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij'))
  coords_flatten = coords.reshape(2, -1)
  relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
  relative_coords = relative_coords.transpose(1, 2, 0).copy()
  relative_coords[:, :, 0] += wh - 1
  relative_coords[:, :, 1] += ww - 1
  relative_coords[:, :, 0] *= 2 * ww - 1
  return relative_coords.sum(-1)


def apply_mod(mod, score):
  """mod(score) on the full index grids, in float64 (params cast to float64)."""
  with jax.enable_x64(True):
    mod64 = jax.tree_util.tree_map(
        lambda p: jnp.asarray(np.asarray(p, np.float64)), mod)
    out = mod64(jnp.asarray(score, jnp.float64),
                *problem_lib.index_grids(*score.shape))
    return np.asarray(out, np.float64)


def brute_force(score, fn):
  """score[b, h, i, j] + fn(b, h, i, j) by explicit loops."""
  out = np.array(score, np.float64)
  for b in range(score.shape[0]):
    for h in range(score.shape[1]):
      for i in range(score.shape[2]):
        for j in range(score.shape[3]):
          out[b, h, i, j] = fn(out[b, h, i, j], b, h, i, j)
  return out


def _score(seed=0, shape=(B, N, T, S)):
  return np.random.default_rng(seed).normal(size=shape)


def _table(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------
# ALiBi.
# ----------------------------------------------------------------------------------------


def test_alibi_slopes_paper_values():
  np.testing.assert_array_equal(score_mods.alibi_slopes(8),
                                [2.0 ** -k for k in range(1, 9)])
  # Non-power-of-two (the reference code's rule): 8 slopes of n = 8, then every other
  # slope of n = 16 (2^-0.5 k).
  want12 = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5,
                                              2.0 ** -3.5]
  np.testing.assert_allclose(score_mods.alibi_slopes(12), want12, rtol=1e-15)
  np.testing.assert_allclose(score_mods.alibi_slopes(16),
                             [2.0 ** (-0.5 * k) for k in range(1, 17)], rtol=1e-14)
  np.testing.assert_allclose(score_mods.alibi_slopes(1), [2.0 ** -8], rtol=1e-15)
  np.testing.assert_allclose(score_mods.alibi_slopes(3),
                             [2.0 ** -4, 2.0 ** -8, 2.0 ** -2], rtol=1e-15)


@pytest.mark.parametrize('symmetric', [False, True])
def test_alibi_matches_paper_equation(symmetric):
  score = _score()
  mod = score_mods.alibi(N, symmetric=symmetric)
  m = score_mods.alibi_slopes(N)

  def fn(x, b, h, i, j):
    # The paper: q_i k_j - m (i - j) for j <= i; the symmetric form uses |i - j|.
    return x - m[h] * (abs(i - j) if symmetric else (i - j))

  # float32 slopes of powers of two are exact.
  np.testing.assert_allclose(apply_mod(mod, score), brute_force(score, fn),
                             rtol=1e-12, atol=1e-12)


def test_alibi_custom_slopes():
  slopes = _table(1, (N,))
  score = _score(1)
  got = apply_mod(score_mods.alibi(N, slopes=jnp.asarray(slopes)), score)
  want = brute_force(score, lambda x, b, h, i, j: x + float(slopes[h]) * (j - i))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# T5.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('bidirectional,num_buckets,max_distance', [
    (True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 9), (True, 33, 50)])
def test_t5_buckets_match_hf(bidirectional, num_buckets, max_distance):
  rel = np.arange(-400, 401)
  got = score_mods.t5_relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance)
  want = hf_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.dtype == jnp.int32
  assert int(want.max()) < num_buckets


@pytest.mark.parametrize('bidirectional', [True, False])
def test_t5_bias_matches_table_lookup(bidirectional):
  nb, md = 8, 12
  table = _table(2, (nb, N))
  score = _score(2, (B, N, 13, 17))
  mod = score_mods.t5_relative_bias(N, num_buckets=nb, max_distance=md,
                                    bidirectional=bidirectional,
                                    table=jnp.asarray(table))

  def fn(x, b, h, i, j):
    bucket = hf_relative_position_bucket(np.asarray(j - i), bidirectional, nb, md)
    return x + float(table[int(bucket), h])

  np.testing.assert_allclose(apply_mod(mod, score), brute_force(score, fn),
                             rtol=1e-12, atol=1e-12)


def test_t5_init():
  mod = score_mods.t5_relative_bias(N)
  assert mod.params.shape == (32, N) and not np.any(np.asarray(mod.params))
  mod = score_mods.t5_relative_bias(N, key=jax.random.key(0))
  p = np.asarray(mod.params)
  assert p.shape == (32, N) and 0.005 < p.std() < 0.03 and np.abs(p).max() <= 0.04


# ----------------------------------------------------------------------------------------
# Relative logits, distance bias, 2D relative bias, soft cap.
# ----------------------------------------------------------------------------------------


def test_relative_logits_matches_clipped_table():
  md = 3
  table = _table(3, (2 * md + 1, N))
  score = _score(3)
  mod = score_mods.relative_logits(N, md, table=jnp.asarray(table))
  want = brute_force(score, lambda x, b, h, i, j: x + float(
      table[min(max(j - i, -md), md) + md, h]))
  np.testing.assert_allclose(apply_mod(mod, score), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('per_head,min_distance', [(True, 0), (False, -4), (None, 2)])
def test_distance_bias_matches_clipped_table(per_head, min_distance):
  d = 6
  shape = (d,) if per_head is False else (d, N)
  table = _table(4, shape)
  score = _score(4)
  mod = score_mods.distance_bias(jnp.asarray(table), per_head=per_head,
                                 min_distance=min_distance)

  def fn(x, b, h, i, j):
    r = min(max(i - j - min_distance, 0), d - 1)
    return x + float(table[r] if len(shape) == 1 else table[r, h])

  np.testing.assert_allclose(apply_mod(mod, score), brute_force(score, fn),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('hw', [(3, 4), (1, 5), (2, 2)])
def test_relative_bias_2d_matches_swin(hw):
  gh, gw = hw
  e = (2 * gh - 1) * (2 * gw - 1)
  table = _table(5, (e, N))
  length = gh * gw
  score = _score(5, (1, N, length, length))
  mod = score_mods.relative_bias_2d(hw, N, table=jnp.asarray(table))
  index = swin_relative_position_index(gh, gw)  # [L, L]
  bias = table[index.reshape(-1)].reshape(length, length, N).transpose(2, 0, 1)
  np.testing.assert_allclose(apply_mod(mod, score), score + bias[None],
                             rtol=1e-12, atol=1e-12)
  # The equation itself: the bias depends only on (y_q - y_k, x_q - x_k).
  got = apply_mod(mod, np.zeros_like(score))
  for i in range(length):
    for j in range(length):
      (yi, xi), (yj, xj) = divmod(i, gw), divmod(j, gw)
      row = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
      np.testing.assert_allclose(got[0, :, i, j], table[row], rtol=1e-12)


def test_soft_cap_matches_equation():
  score = _score(6) * 40
  got = apply_mod(score_mods.soft_cap(20.0), score)
  np.testing.assert_allclose(got, 20.0 * np.tanh(score / 20.0), rtol=1e-13)
  assert np.abs(got).max() < 20.0


def test_compose_applies_left_to_right():
  table = _table(7, (5, N))
  score = _score(7)
  bias = score_mods.distance_bias(jnp.asarray(table))
  got = apply_mod(score_mods.compose(bias, score_mods.soft_cap(2.0)), score)
  want = 2.0 * np.tanh(apply_mod(bias, score) / 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # A plain closure joins too (its closed-over array becomes a param).
  w = jnp.asarray(_table(8, (N,)))
  mod = score_mods.compose(score_mods.soft_cap(2.0), lambda s, b, h, q, k: s * w[h])
  got = apply_mod(mod, score)
  want = 2.0 * np.tanh(score / 2.0) * np.asarray(w, np.float64)[None, :, None, None]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert mod.name == 'soft_cap+<lambda>'


# ----------------------------------------------------------------------------------------
# Kernel-facing properties: tile broadcasting, no gathers, equal keys.
# ----------------------------------------------------------------------------------------


def _all_mods():
  return {
      'alibi': score_mods.alibi(N),
      't5': score_mods.t5_relative_bias(N, num_buckets=8, max_distance=16,
                                        key=jax.random.key(1)),
      'relative_logits': score_mods.relative_logits(N, 4, key=jax.random.key(2)),
      'distance_bias': score_mods.distance_bias(jnp.asarray(_table(9, (5, N)))),
      'relative_bias_2d': score_mods.relative_bias_2d((3, 3), N,
                                                      key=jax.random.key(3)),
      'soft_cap': score_mods.soft_cap(3.0),
  }


@pytest.mark.parametrize('name', sorted(_all_mods()))
def test_tiles_agree_with_full_grid_and_have_no_gather(name):
  mod = _all_mods()[name]
  score = jnp.asarray(_score(10), jnp.float32)
  full = mod(score, *problem_lib.index_grids(B, N, T, S))
  # A kernel's tile: scalar b and h, q_idx [bq, 1], kv_idx [1, bk] at an offset.
  b, h, q0, k0, bq, bk = 1, 2, 3, 5, 4, 6
  q_idx = jnp.arange(q0, q0 + bq, dtype=jnp.int32)[:, None]
  kv_idx = jnp.arange(k0, k0 + bk, dtype=jnp.int32)[None, :]
  tile = mod(score[b, h, q0:q0 + bq, k0:k0 + bk], jnp.int32(b), jnp.int32(h),
             q_idx, kv_idx)
  np.testing.assert_array_equal(np.asarray(tile),
                                np.asarray(full[b, h, q0:q0 + bq, k0:k0 + bk]))
  jaxpr = jax.make_jaxpr(mod)(score, *problem_lib.index_grids(B, N, T, S))
  prims = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert not prims & {'gather', 'dynamic_slice', 'scatter-add'}, prims


def test_equal_hyperparameters_share_a_static_key():
  a = score_mods.t5_relative_bias(N, key=jax.random.key(0))
  b = score_mods.t5_relative_bias(N, key=jax.random.key(1))
  c = score_mods.t5_relative_bias(N, num_buckets=16)
  assert a.static_key == b.static_key
  assert a.static_key != c.static_key
  assert score_mods.soft_cap(2.0).static_key == score_mods.soft_cap(2.0).static_key
  assert score_mods.soft_cap(2.0).static_key != score_mods.soft_cap(3.0).static_key


# ----------------------------------------------------------------------------------------
# Gradients through attention vs a dense bias.
# ----------------------------------------------------------------------------------------


def _dense_biases():
  """name -> (make_mod(table), dense_bias(table) [1, N, T, S] by jnp indexing, table)."""
  t, s = T, S
  q = np.arange(t)[:, None]
  k = np.arange(s)[None, :]
  t5_bucket = hf_relative_position_bucket(k - q, False, 8, 12)
  rl = np.clip(k - q, -3, 3) + 3
  db = np.clip(q - k, 0, 4)
  gh, gw = 3, 4  # T = 9 queries, S = 11 keys on a 3 x 4 grid (12 positions).
  qy, qx, ky, kx = q // gw, q % gw, k // gw, k % gw
  swin = (qy - ky + gh - 1) * (2 * gw - 1) + (qx - kx + gw - 1)

  def per_head(index):
    return lambda tab: jnp.transpose(tab[jnp.asarray(index)], (2, 0, 1))[None]

  return {
      'alibi': (lambda tab: score_mods.alibi(N, slopes=tab),
                lambda tab: (tab[:, None, None] * jnp.asarray(k - q, tab.dtype))[None],
                _table(11, (N,)) * 0.3),
      't5': (lambda tab: score_mods.t5_relative_bias(
          N, num_buckets=8, max_distance=12, bidirectional=False, table=tab),
             per_head(t5_bucket), _table(12, (8, N))),
      'relative_logits': (lambda tab: score_mods.relative_logits(N, 3, table=tab),
                          per_head(rl), _table(13, (7, N))),
      'distance_bias': (lambda tab: score_mods.distance_bias(tab),
                        per_head(db), _table(14, (5, N))),
      'distance_bias_shared': (
          lambda tab: score_mods.distance_bias(tab, per_head=False),
          lambda tab: tab[jnp.asarray(db)][None, None], _table(15, (5,))),
      'relative_bias_2d': (lambda tab: score_mods.relative_bias_2d((gh, gw), N,
                                                                   table=tab),
                           per_head(swin), _table(16, (35, N))),
  }


@pytest.mark.parametrize('name', sorted(_dense_biases()))
def test_table_gradients_match_dense_bias(name):
  make_mod, dense, table = _dense_biases()[name]
  rng = np.random.default_rng(20)
  with jax.enable_x64(True):
    q = jnp.asarray(rng.normal(size=(B, T, N, 8)))
    k = jnp.asarray(rng.normal(size=(B, S, 2, 8)))
    v = jnp.asarray(rng.normal(size=(B, S, 2, 5)))
    w = jnp.asarray(rng.normal(size=(B, T, N, 5)))
    tab = jnp.asarray(table, jnp.float64)

    def loss_mod(tab, q, k, v):
      out = attention.dot_product_attention(q, k, v, score_mod=make_mod(tab),
                                            is_causal=True, implementation='reference')
      return jnp.sum(out * w)

    def loss_dense(tab, q, k, v):
      out = attention.dot_product_attention(q, k, v, bias=dense(tab), is_causal=True,
                                            implementation='reference')
      return jnp.sum(out * w)

    got = jax.jit(jax.value_and_grad(loss_mod, argnums=(0, 1, 2, 3)))(tab, q, k, v)
    want = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1, 2, 3)))(
        tab, q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, wg in zip(got[1], want[1]):
      np.testing.assert_allclose(g, wg, rtol=1e-10, atol=1e-12)
    assert np.abs(np.asarray(got[1][0])).max() > 1e-6  # the tables do get gradients


# ----------------------------------------------------------------------------------------
# Bad arguments.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('call,error,match', [
    (lambda: score_mods.alibi(0), ValueError, 'num_heads'),
    (lambda: score_mods.alibi(True), TypeError, 'num_heads'),
    (lambda: score_mods.alibi(4, slopes=jnp.ones(3)), ValueError, 'slopes'),
    (lambda: score_mods.alibi(4, slopes=jnp.ones(4, jnp.int32)), TypeError, 'slopes'),
    (lambda: score_mods.alibi_slopes(-2), ValueError, 'num_heads'),
    (lambda: score_mods.t5_relative_bias(4, num_buckets=3), ValueError, 'num_buckets'),
    (lambda: score_mods.t5_relative_bias(4, max_distance=8), ValueError,
     'max_distance'),
    (lambda: score_mods.t5_relative_bias(4, table=jnp.ones((32, 3))), ValueError,
     'table'),
    (lambda: score_mods.t5_relative_bias(4, table=jnp.ones((32, 4)),
                                         key=jax.random.key(0)), ValueError, 'table'),
    (lambda: score_mods.t5_relative_bias(4, bidirectional=1), TypeError,
     'bidirectional'),
    (lambda: score_mods.relative_logits(4, 0), ValueError, 'max_distance'),
    (lambda: score_mods.relative_logits(4, 2, table=jnp.ones((4, 4))), ValueError,
     'table'),
    (lambda: score_mods.distance_bias(jnp.ones((3, 4)), per_head=False), ValueError,
     'table'),
    (lambda: score_mods.distance_bias(jnp.ones((0,))), ValueError, 'table'),
    (lambda: score_mods.distance_bias([1.0, 2.0]), TypeError, 'table'),
    (lambda: score_mods.distance_bias(jnp.ones(3), min_distance=0.5), TypeError,
     'min_distance'),
    (lambda: score_mods.relative_bias_2d((3,), 4), ValueError, 'grid_hw'),
    (lambda: score_mods.relative_bias_2d((3, 0), 4), ValueError, r'grid_hw\[1\]'),
    (lambda: score_mods.relative_bias_2d((2, 2), 4, table=jnp.ones((8, 4))),
     ValueError, 'table'),
    (lambda: score_mods.soft_cap(0.0), ValueError, 'cap'),
    (lambda: score_mods.soft_cap(float('inf')), ValueError, 'cap'),
    (lambda: score_mods.soft_cap('1'), TypeError, 'cap'),
    (lambda: score_mods.compose(), ValueError, 'mods'),
    (lambda: score_mods.compose(score_mods.soft_cap(1.0), 3), TypeError, r'mods\[1\]'),
])
def test_bad_arguments(call, error, match):
  with pytest.raises(error, match=match):
    call()
