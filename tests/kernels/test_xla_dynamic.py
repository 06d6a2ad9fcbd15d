"""The xla path over a traced DynamicBlockMask (kernels/xla/dynamic.py) vs oracles.

The oracle is `kernels.reference` on the same problem (it materialises the block mask
as a dense [B, N, T, S] mask), in float64, forward and gradients (q, k, v, bias,
sinks, score_mod parameters), over head mappings that exercise every unit layout
(lists per query head, per kv head, shared; GQA with units of one and two heads),
row chunks that leave padding rows, padding of T and S, non-square blocks, inner
masks (plain causal evaluated from indices, head-dependent bitmaps), bias broadcast
shapes, dense masks, segments, dropout, soft-cap and empty lists.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from kernels import problem as problem_lib
from kernels import reference
from kernels import xla
from kernels.xla import dynamic


def _qkv(rng, b, t, s, n, kh, hd, hv, dtype=np.float64):
  return (rng.normal(size=(b, t, n, hd)).astype(dtype) * 1.5,
          rng.normal(size=(b, s, kh, hd)).astype(dtype),
          rng.normal(size=(b, s, kh, hv)).astype(dtype))


def _random_lists(rng, bm, hm, t, s, bq, bk, budget, empty_row=True):
  """A DynamicBlockMask of random block matrices (at most `budget` per row)."""
  nq, nk = -(-t // bq), -(-s // bk)
  scores = rng.random((bm, hm, nq, nk))
  keep = np.argsort(-scores, -1)[..., :budget]
  blocks = np.zeros((bm, hm, nq, nk), bool)
  np.put_along_axis(blocks, keep, True, -1)
  blocks &= rng.random((bm, hm, nq, nk)) < 0.85  # some rows list fewer
  if empty_row:
    blocks[0, 0, min(1, nq - 1)] = False  # a row that lists nothing
  return blocks


def _loss(fn, argnums, q, k, v, bias, sinks, params, kwargs, mod_fn=None):
  """Value-and-grad of sum(out cos out) + 0.3 sum(finite lse^2) through `fn`."""

  def loss(q, k, v, bias, sinks, params):
    kw = dict(kwargs)
    if bias is not None:
      kw['bias'] = bias
    if sinks is not None:
      kw['sinks'] = sinks
    if params is not None:
      kw['score_mod'] = problem_lib.ScoreMod(mod_fn, params)
    problem = problem_lib.make_problem(q, k, v, return_residuals=True, **kw)
    out, lse = fn(q, k, v, problem)
    lse_t = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * jnp.cos(out)) + 0.3 * jnp.sum(lse_t * lse_t), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(
      loss, argnums=argnums, has_aux=True))(q, k, v, bias, sinks, params)
  return out, lse, grads


def _alibi_fn(params, score, b, h, q_idx, kv_idx):
  del b
  return score - params[h] * jnp.abs(q_idx - kv_idx).astype(score.dtype)


def _check_against_reference(q, k, v, blocks, geometry, *, bias=None, sinks=None,
                             slopes=None, options=None, **kwargs):
  """xla (dynamic) vs the reference in float64: out, lse and every gradient."""
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    bias = None if bias is None else jnp.asarray(bias, jnp.float64)
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float64)
    slopes = None if slopes is None else jnp.asarray(slopes, jnp.float64)
    argnums = tuple(i for i, x in enumerate((q, k, v, bias, sinks, slopes))
                    if x is not None)
    inner = kwargs.pop('inner', None)

    def make(blocks):
      return masks.from_block_matrix(blocks, inner=inner, **geometry)

    def run(fn, blocks):
      kw = dict(kwargs, mask=(make(blocks),) + tuple(kwargs.get('mask', ())))
      return _loss(fn, argnums, q, k, v, bias, sinks, slopes, kw, _alibi_fn)

    impl = functools.partial(xla.attention, **(options or {}))
    got = jax.jit(functools.partial(run, impl))(jnp.asarray(blocks))
    want = jax.jit(functools.partial(run, reference.attention))(jnp.asarray(blocks))
    out, lse, grads = got
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want[1]))
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, want[0], atol=1e-10, rtol=1e-9)
    finite = np.isfinite(np.asarray(want[1]))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want[1])[finite],
                               atol=1e-10, rtol=1e-9)
    for i, (g, w) in enumerate(zip(grads, want[2])):
      assert np.all(np.isfinite(np.asarray(g))), argnums[i]
      np.testing.assert_allclose(g, w, atol=1e-9, rtol=1e-8,
                                 err_msg=f'grad of argument {argnums[i]}')
    return np.asarray(lse)


def test_per_query_head_lists_gqa_causal_offset_bias_sinks_chunks():
  """Hm = N with GQA 4/2 (units of one head), causal offset, row chunks of 3."""
  rng = np.random.default_rng(0)
  b, t, s, n, kh = 2, 40, 56, 4, 2
  q, k, v = _qkv(rng, b, t, s, n, kh, 16, 8)
  blocks = _random_lists(rng, b, n, t, s, 16, 16, 3)
  bias = rng.normal(size=(b, n, t, s))
  bias[1, 2, :, 50:] = -np.inf
  lse = _check_against_reference(
      q, k, v, blocks, dict(q_len=t, kv_len=s, block_q=16, block_kv=16, budget=3),
      bias=bias, sinks=rng.normal(size=(n,)), inner=masks.causal(t, s, offset=16),
      logits_soft_cap=3.0, options=dict(rows_per_step=3))
  assert np.isfinite(lse).all()  # sinks: every row has mass


def test_shared_lists_head_dependent_inner_segments_closure():
  """Hm = 1, GQA 6/3 (units of two heads), non-square blocks, per-head inner mask,
  per-head bias [1, N, T, S] and dense mask [B, N, T, S] tiles, ALiBi params."""
  rng = np.random.default_rng(1)
  b, t, s, n, kh = 2, 30, 44, 6, 3
  q, k, v = _qkv(rng, b, t, s, n, kh, 8, 8)
  blocks = _random_lists(rng, 1, 1, t, s, 8, 16, 2)
  inner = masks.per_head([masks.causal(t, s, offset=14), masks.full(t, s),
                          masks.sliding_window(t, 9, 3, kv_len=s),
                          ~masks.causal(t, s), masks.causal(t, s, offset=20),
                          masks.prefix_lm(t, 6, kv_len=s)])
  q_seg = np.stack([np.repeat([0, 1], [12, 18]), np.repeat([0, 1, 2], [5, 5, 20])])
  kv_seg = np.stack([np.repeat([0, 1], [20, 24]), np.repeat([0, 1, 2], [9, 9, 26])])
  dense = rng.random((b, n, t, s)) < 0.8
  lse = _check_against_reference(
      q, k, v, blocks, dict(q_len=t, kv_len=s, block_q=8, block_kv=16, budget=2),
      bias=rng.normal(size=(1, n, t, s)), slopes=np.linspace(0.1, 0.6, n),
      inner=inner,
      mask=(jnp.asarray(dense),),
      segment_ids=(jnp.asarray(q_seg), jnp.asarray(kv_seg)),
      options=dict(rows_per_step=5))
  assert np.isneginf(lse).any()


def test_mixed_units_broadcast_bias_dropout_value_dim():
  """Hm = 2 with GQA 6/3: list rows and kv heads cut the heads differently (units
  of one); a [1, 1, T, 1] bias (reduced gradient), dropout, head_dim_v != head_dim,
  a window as causal & ~causal (evaluated from indices, keys past S masked)."""
  rng = np.random.default_rng(2)
  b, t, s, n, kh = 1, 33, 33, 6, 3
  q, k, v = _qkv(rng, b, t, s, n, kh, 8, 12)
  blocks = _random_lists(rng, 1, 2, t, s, 16, 16, 2, empty_row=False)
  _check_against_reference(
      q, k, v, blocks, dict(q_len=t, kv_len=s, block_q=16, block_kv=16),
      bias=rng.normal(size=(1, 1, t, 1)), dropout_rate=0.3,
      dropout_key=jax.random.key(5),
      inner=masks.causal(t) & ~masks.causal(t, offset=-12))


def test_batch_lists_key_bias_no_inner():
  """Bm = B, Hm = K, GQA 4/2, [B, 1, 1, S] bias, kv padding without an inner mask."""
  rng = np.random.default_rng(3)
  b, t, s, n, kh = 2, 20, 37, 4, 2
  q, k, v = _qkv(rng, b, t, s, n, kh, 8, 8)
  blocks = _random_lists(rng, b, kh, t, s, 16, 16, 2)
  _check_against_reference(
      q, k, v, blocks, dict(q_len=t, kv_len=s, block_q=16, block_kv=16, budget=2),
      bias=rng.normal(size=(b, 1, 1, s)), sinks=rng.normal(size=(n,)))


def test_matches_static_path_on_the_same_blocks():
  """Equal (float32) to the static xla path on `static_equivalent` of the lists."""
  rng = np.random.default_rng(4)
  t, n, blk = 64, 4, 16
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, 1, t, t, n, n, 16, 16))
  nb = t // blk
  scores = jnp.asarray(np.where(np.tril(np.ones((nb, nb), bool), -1),
                                rng.normal(size=(1, n, nb, nb)), -np.inf))
  dyn = masks.top_k_blocks(scores, 2, q_len=t, kv_len=t, block_q=blk, block_kv=blk,
                           always=jnp.eye(nb, dtype=bool), inner=masks.causal(t))
  static = dynamic.static_equivalent(dyn, n)
  np.testing.assert_array_equal(static.materialize(n),
                                np.asarray(dyn.materialize(n))[0])
  got = attention.dot_product_attention(q, k, v, mask=dyn, implementation='xla')
  want = attention.dot_product_attention(q, k, v, mask=static, implementation='xla')
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_nothing_listed_gives_zeros_and_zero_grads():
  """Every count 0: out 0, lse -inf, all gradients exactly 0 (no NaN)."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, 1, 24, 24, 2, 2, 8, 8))
  dyn = masks.from_block_matrix(jnp.zeros((1, 1, 2, 2), bool), q_len=24, kv_len=24,
                                block_q=16, block_kv=16)

  def f(q, k, v):
    out, lse = attention.dot_product_attention(q, k, v, mask=dyn, return_residuals=True,
                                               implementation='xla')
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(
      q, k, v)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_unlisted_blocks_are_never_read_and_nan_propagates():
  """NaN in an unlisted kv block changes nothing; NaN in q reaches its row only."""
  rng = np.random.default_rng(6)
  t, n = 48, 2
  q, k, v = (np.asarray(x, np.float32) for x in _qkv(rng, 1, t, t, n, n, 8, 8))
  blocks = np.zeros((1, 1, 3, 3), bool)
  blocks[0, 0, :, 0] = True  # kv blocks 1 and 2 are listed by nobody
  blocks[0, 0, 2, 2] = True  # except kv block 2 by q block 2
  dyn = masks.from_block_matrix(jnp.asarray(blocks), q_len=t, kv_len=t, block_q=16,
                                block_kv=16)
  v_nan = v.copy()
  v_nan[0, 20, 1] = np.nan  # kv block 1
  q_nan = q.copy()
  q_nan[0, 3, 0, 0] = np.nan
  fn = jax.jit(functools.partial(attention.dot_product_attention, mask=dyn,
                                 implementation='xla'))
  clean = np.asarray(fn(q, k, v))
  np.testing.assert_array_equal(np.asarray(fn(q, k, v_nan)), clean)
  out = np.asarray(fn(q_nan, k, v))
  assert np.isnan(out[0, 3, 0]).all()
  nan_rows = np.isnan(out).any(-1)
  nan_rows[0, 3, 0] = False
  assert not nan_rows.any()


def test_new_lists_same_shape_do_not_retrace():
  """A jitted call with new routing data (same shapes) compiles once."""
  rng = np.random.default_rng(7)
  t, n = 32, 2
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, 1, t, t, n, n, 8, 8))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, k, v, dyn):
    return jax.grad(lambda q: jnp.sum(attention.dot_product_attention(
        q, k, v, mask=dyn, is_causal=True, implementation='xla')))(q)

  chex.clear_trace_counter()
  for seed in range(3):
    scores = jnp.asarray(np.random.default_rng(seed).normal(size=(1, n, 2, 2)))
    dyn = masks.top_k_blocks(scores, 1, q_len=t, kv_len=t, block_q=16, block_kv=16)
    f(q, k, v, dyn)


def test_bad_rows_per_step():
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, 1, 16, 16, 1, 1, 8, 8))
  dyn = masks.from_block_matrix(jnp.ones((1, 1, 1, 1), bool), q_len=16, kv_len=16,
                                block_q=16, block_kv=16)
  problem = problem_lib.make_problem(q, k, v, mask=dyn)
  with pytest.raises(ValueError, match='rows_per_step'):
    xla.attention(q, k, v, problem, rows_per_step=0)


def test_static_equivalent_bad_input():
  dyn = masks.from_block_matrix(jnp.ones((1, 1, 2, 2), bool), q_len=32, kv_len=32,
                                block_q=16, block_kv=16)
  with pytest.raises(ValueError, match='batch'):
    dynamic.static_equivalent(dyn, 2, batch=1)
  with pytest.raises(TypeError, match='block_mask'):
    dynamic.static_equivalent(masks.causal(32), 2)
