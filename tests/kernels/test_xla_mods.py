"""-inf biases, score_mod and dropout in the blocked XLA attention vs the float64 oracle.

Every path of kernels/xla/ (fused and online steps, kv chunks, lanes, separate
backward tiles) against `kernels.reference` on the same `AttentionProblem`.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.masks import base
from kernels import problem as problem_lib
from kernels import reference
from kernels import xla
from tests.kernels import test_xla

_rand = test_xla._rand  # pylint: disable=protected-access
_window = test_xla._window  # pylint: disable=protected-access

# Every forward / backward path on small tiles.
_PATHS = {
    'fused': dict(block_q=8, block_kv=8, kv_chunk=1, fused=True),
    'online': dict(block_q=8, block_kv=8, kv_chunk=1, fused=False),
    'chunked': dict(block_q=8, block_kv=8, kv_chunk=3),
    'lanes': dict(block_q=8, block_kv=16, kv_chunk=1, lanes=3, fused=False),
    'fused_lanes_bwd_tiles': dict(block_q=16, block_kv=8, lanes=2, fused=True,
                                  bwd_block_q=8, bwd_block_kv=16),
}


def _loss_grads(fn, q, k, v, argnums, **problem_kwargs):
  """(out, lse, grads of sum(out cos out) + 0.3 sum(finite lse^2))."""

  def loss(*args):
    q, k, v, bias, sinks, params = args
    kw = dict(problem_kwargs)
    if bias is not None:
      kw['bias'] = bias
    if sinks is not None:
      kw['sinks'] = sinks
    if params is not None:
      kw['score_mod'] = problem_lib.ScoreMod(kw['score_mod'].fn, params,
                                             kw['score_mod'].name)
    problem = problem_lib.make_problem(q, k, v, return_residuals=True, **kw)
    out, lse = fn(q, k, v, problem)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * jnp.cos(out)) + 0.3 * jnp.sum(lse_term * lse_term), (out,
                                                                             lse)

  mod = problem_kwargs.get('score_mod')
  args = (q, k, v, problem_kwargs.get('bias'), problem_kwargs.get('sinks'),
          None if mod is None else mod.params)
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums,
                                              has_aux=True)(*args)
  return out, lse, grads


def _compare(impl_kwargs, q, k, v, *, atol=1e-9, **problem_kwargs):
  argnums = [0, 1, 2]
  for i, name in ((3, 'bias'), (4, 'sinks'), (5, 'score_mod')):
    if problem_kwargs.get(name) is not None:
      argnums.append(i)
  argnums = tuple(argnums)

  def ours(q, k, v, problem):
    return xla.attention(q, k, v, problem, **impl_kwargs)

  got = _loss_grads(ours, q, k, v, argnums, **problem_kwargs)
  want = _loss_grads(reference.attention, q, k, v, argnums, **problem_kwargs)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=atol,
                             rtol=0, err_msg='out')
  np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
  finite = np.isfinite(np.asarray(want[1]))
  np.testing.assert_allclose(np.asarray(got[1])[finite],
                             np.asarray(want[1])[finite], atol=atol, rtol=0)
  for i, g, w in zip(argnums, got[2], want[2]):
    for gl, wl in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(w)):
      assert np.isfinite(np.asarray(gl)).all(), i
      np.testing.assert_allclose(np.asarray(gl), np.asarray(wl), atol=atol,
                                 rtol=1e-9, err_msg=f'grad of argument {i}')
  return got


def test_key_padding_bias_default_path_no_nan():
  """-inf on padded keys of one batch item ([B, 1, 1, S] bias), automatic tiling."""
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 512, 4, 32
  q, k, v = (_rand(rng, b, t, n, h, dtype=np.float32) for _ in range(3))
  bias = np.zeros((b, 1, 1, t), np.float32)
  bias[1, 0, 0, 256:] = -np.inf
  bias = jnp.asarray(bias)

  def loss(q, k, v):
    problem = problem_lib.make_problem(q, k, v, bias=bias)
    return jnp.sum(xla.attention(q, k, v, problem) ** 2)

  def ref_loss(q, k, v):
    problem = problem_lib.make_problem(q, k, v, bias=bias)
    return jnp.sum(reference.attention(q, k, v, problem) ** 2)

  out = xla.attention(q, k, v, problem_lib.make_problem(q, k, v, bias=bias))
  want = reference.attention(q, k, v, problem_lib.make_problem(q, k, v, bias=bias))
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  want_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(grads, want_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-4)
  np.testing.assert_array_equal(np.asarray(grads[1])[1, 256:], 0.0)


def _inf_bias(rng, b, n, t, s):
  """A [B, N, T, S] bias with -inf: scattered, whole rows, and whole 8 x 8 tiles."""
  bias = rng.standard_normal((b, n, t, s))
  bias[rng.random((b, n, t, s)) < 0.3] = -np.inf
  bias[0, 1, 3] = -np.inf  # a row that sees nothing
  bias[1, :, 10:12] = -np.inf  # rows of every head
  bias[:, 2, 8:16, 0:8] = -np.inf  # a whole tile
  bias[1, 0, :, 16:24] = -np.inf  # a whole kv block for every row
  return jnp.asarray(bias)


@pytest.mark.parametrize('path', list(_PATHS))
def test_inf_bias_every_path(path):
  rng = np.random.default_rng(1)
  b, t, s, n, kh = 2, 29, 37, 4, 2
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 5)
    bias = _inf_bias(rng, b, n, t, s)
    # -inf bias with a causal mask and segments; then with sinks.
    segments = (jnp.asarray(rng.integers(0, 2, (b, t))),
                jnp.asarray(rng.integers(0, 2, (b, s))))
    got = _compare(_PATHS[path], q, k, v, bias=bias,
                   mask=base.causal(t, s, offset=8), segment_ids=segments,
                   logits_soft_cap=3.0)
    out = np.asarray(got[0])
    np.testing.assert_array_equal(out[0, 3, 1], 0.0)  # the row that sees nothing
    np.testing.assert_array_equal(out[1, 10:12], 0.0)
    _compare(_PATHS[path], q, k, v, bias=bias, sinks=_rand(rng, n),
             mask=_window(t, s, 11))


def _alibi_table_mod(n, span, rng):
  """slopes[h] * (kv - q) + table[h, clip(kv - q)], -inf where (kv - q) % 7 == 3."""

  def fn(params, score, b, h, q_idx, kv_idx):
    slopes, table = params
    rel = kv_idx - q_idx
    out = score + slopes[h] * rel.astype(score.dtype) * 0.1
    out = out + table[h, jnp.clip(rel + span, 0, 2 * span)] + 0.01 * b
    return jnp.where(rel % 7 == 3, -jnp.inf, out)

  params = (jnp.asarray(rng.standard_normal(n)),
            jnp.asarray(rng.standard_normal((n, 2 * span + 1))))
  return problem_lib.ScoreMod(fn, params, 'alibi_table')


def _irregular_heads(rng, n, t, s):
  """Heads {0, 2, 3} share a structure (an irregular GQA group), head 1 is causal."""
  masks = rng.random((n, t, s)) < 0.6
  masks[2] = masks[3] = masks[0]
  masks[1] = np.tril(np.ones((t, s), bool))
  return base.from_array(masks)


@pytest.mark.parametrize('path', list(_PATHS))
def test_score_mod_every_path(path):
  rng = np.random.default_rng(2)
  b, t, s, n, kh = 2, 29, 37, 4, 2
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 5)
    mod = _alibi_table_mod(n, 6, rng)
    _compare(_PATHS[path], q, k, v, score_mod=mod, bias=_rand(rng, b, 1, t, s),
             sinks=_rand(rng, n), logits_soft_cap=2.5,
             mask=base.causal(t, s, offset=8))
    # Head-dependent masks regroup and reorder the heads: h must follow them.
    _compare(_PATHS[path], q, k, v, score_mod=mod, mask=_irregular_heads(rng, n, t, s),
             segment_ids=(jnp.asarray(rng.integers(0, 2, (b, t))),
                          jnp.asarray(rng.integers(0, 2, (b, s)))))


def test_score_mod_plain_closure_and_every_key_hidden():
  rng = np.random.default_rng(3)
  b, t, n = 1, 24, 2
  with jax.enable_x64(True):
    q, k, v = (_rand(rng, b, t, n, 8) for _ in range(3))
    table = jnp.asarray(rng.standard_normal(2 * t))

    def plain(score, b, h, q_idx, kv_idx):  # closes over `table` (a param)
      hidden = (q_idx == 5) | (kv_idx >= 16) & (h == 1)
      return jnp.where(hidden, -jnp.inf, score + table[kv_idx - q_idx + t])

    mod = problem_lib.as_score_mod(plain, jnp.float64)
    for path in ('fused', 'chunked'):  # the online step: test_score_mod_every_path
      got = _compare(_PATHS[path], q, k, v, score_mod=mod, is_causal=True)
      np.testing.assert_array_equal(np.asarray(got[0])[0, 5], 0.0)


def test_score_mod_new_table_does_not_retrace():
  rng = np.random.default_rng(4)
  q, k, v = (_rand(rng, 1, 16, 2, 8, dtype=np.float32) for _ in range(3))
  chex.clear_trace_counter()

  def fn(table, score, b, h, q_idx, kv_idx):
    return score + table[h, kv_idx]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(table, q, k, v):
    problem = problem_lib.make_problem(
        q, k, v, is_causal=True, score_mod=problem_lib.ScoreMod(fn, table, 't'))
    return jax.grad(lambda tb, q: jnp.sum(xla.attention(
        q, k, v, problem.replace(score_mod=problem_lib.ScoreMod(fn, tb, 't'))) ** 2),
                    argnums=(0, 1))(table, q)

  g1 = f(jnp.zeros((2, 16)), q, k, v)
  g2 = f(jnp.ones((2, 16)), q, k, v)
  assert g1[0].shape == (2, 16) and np.isfinite(np.asarray(g2[0])).all()
  # Outside jit too: the same compiled kernel for a new table value.
  traces = []
  original = xla.blocked._forward  # pylint: disable=protected-access

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  mod_a = problem_lib.ScoreMod(fn, jnp.zeros((2, 16)), 't')
  mod_b = problem_lib.ScoreMod(fn, jnp.ones((2, 16)), 't')
  try:
    xla.blocked._forward = counting  # pylint: disable=protected-access
    for mod in (mod_a, mod_b):
      xla.attention(q, k, v, problem_lib.make_problem(q, k, v, is_causal=True,
                                                      score_mod=mod), block_q=8)
  finally:
    xla.blocked._forward = original  # pylint: disable=protected-access
  assert len(traces) == 1


@pytest.mark.parametrize('impl_kwargs', [
    dict(block_q=8, block_kv=8, kv_chunk=1),
    dict(block_q=16, block_kv=8, kv_chunk=2, lanes=2),
    dict(block_q=8, block_kv=16, lanes=3, bwd_block_q=16, bwd_block_kv=8),
    dict(fused=True),  # dropout takes the online step regardless
])
def test_dropout_matches_reference_for_every_tiling(impl_kwargs):
  rng = np.random.default_rng(5)
  b, t, s, n, kh = 2, 29, 37, 4, 2
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 5)
    common = dict(mask=base.causal(t, s, offset=8), bias=_rand(rng, 1, n, t, s),
                  sinks=_rand(rng, n), score_mod=_alibi_table_mod(n, 4, rng))
    got = _compare(impl_kwargs, q, k, v, dropout_rate=0.3,
                   dropout_key=jax.random.key(7), **common)
    # Some probabilities were dropped: the output differs from no dropout, and the
    # lse (of the undropped softmax) does not.
    plain, plain_lse = xla.attention(q, k, v, problem_lib.make_problem(
        q, k, v, return_residuals=True, **common), **impl_kwargs)
    assert np.abs(np.asarray(got[0]) - np.asarray(plain)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(plain_lse),
                               atol=1e-12)


@pytest.mark.parametrize('path', ['fused', 'online', 'chunked'])
def test_nan_inputs_propagate_with_inf_bias(path):
  rng = np.random.default_rng(6)
  q, k, v = (_rand(rng, 1, 16, 2, 8, dtype=np.float32) for _ in range(3))
  q = q.at[0, 3, 1].set(jnp.nan)
  bias = jnp.zeros((1, 1, 1, 16)).at[0, 0, 0, 8:].set(-jnp.inf)
  out = xla.attention(q, k, v, problem_lib.make_problem(q, k, v, bias=bias),
                      **_PATHS[path])
  assert np.isnan(np.asarray(out)[0, 3, 1]).all()
  assert np.isfinite(np.asarray(out)[0, 3, 0]).all()
  assert np.isfinite(np.delete(np.asarray(out), 3, axis=1)).all()
