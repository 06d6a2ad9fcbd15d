"""Pallas block-sparse flash attention (TPU Mosaic / GPU Triton) in interpret mode.

Oracles: the float64 dense reference (`kernels.reference`) for outputs, lse and
gradients (q, k, v, sinks, bias, score_mod params; the loss also weights lse, so the
lse cotangent path is checked), JAX's splash attention (interpret mode) on masks both
express, brute-force block tables for the static plan, and cross-platform lowering to
Mosaic / Triton IR. Interpret mode compiles slowly on CPU, so shapes and tiles are
tiny (TPU tiles of 8-16 run in interpret mode only) and each case checks many
features at once.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from attention.masks import base
from kernels import problem as problem_lib
from kernels import reference
from kernels.pallas import common
from kernels.pallas import gpu as pallas_gpu
from kernels.pallas import tpu as pallas_tpu
from tests import oracles

IMPLS = ('pallas_tpu', 'pallas_gpu')
# Interpret-mode programs are large; LLVM -O0 cuts their CPU compile time ~40%
# (numerics unchanged: XLA CPU does not use fast-math either way).
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})
MODULES = {'pallas_tpu': pallas_tpu, 'pallas_gpu': pallas_gpu}
SMALL = {'pallas_tpu': pallas_tpu.BlockSizes(block_q=16, block_kv=16),
         'pallas_gpu': pallas_gpu.BlockSizes(block_q=16, block_kv=16)}


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed, b, t, s, n, kh, h, hv, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, hv), jnp.float32).astype(dtype)
  w_out = jax.random.normal(ks[3], (b, t, n, hv), jnp.float64)
  w_lse = jax.random.normal(ks[4], (b, n, t), jnp.float64)
  sinks = jax.random.normal(ks[5], (n,), jnp.float32)
  return q, k, v, w_out, w_lse, sinks


def _value_and_grads(impl, q, k, v, sinks, bias, w_out, w_lse, sizes=None,
                     mod=None, params=None, **kw):
  """(out, lse, dq, dk, dv[, dsinks][, dbias][, dparams]) of a loss of out and lse.

  `mask` in `kw` is passed as a traced argument (the kernels' dynamic-mask path);
  `static_mask` is closed over, so it stays concrete (compiled into the BlockMask).
  `mod` is a score_mod fn(params, score, b, h, q_idx, kv_idx) with traced `params`.
  `impl` is 'reference' or a kernel name (run with `sizes`, default SMALL tiles).
  """
  mask = kw.pop('mask', None)
  static_mask = kw.pop('static_mask', None)
  if isinstance(mask, base.Mask):  # Mask objects are static by nature
    static_mask, mask = mask, None

  def loss(q, k, v, sinks, bias, params, mask):
    score_mod = None if mod is None else problem_lib.ScoreMod(mod, params)
    problem = problem_lib.make_problem(
        q, k, v, sinks=sinks, bias=bias, score_mod=score_mod,
        mask=static_mask if mask is None else mask, return_residuals=True, **kw)
    if impl == 'reference':
      out, lse = reference.attention(q, k, v, problem)
    else:
      out, lse = MODULES[impl].attention(q, k, v, problem,
                                         block_sizes=sizes or SMALL[impl])
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    val = (jnp.sum(out.astype(jnp.float64) * w_out) +
           jnp.sum(finite.astype(jnp.float64) * w_lse))
    return val, (out, lse)

  argnums = tuple(i for i, x in enumerate((q, k, v, sinks, bias, params))
                  if x is not None)
  fn = _jit(jax.grad(loss, argnums=argnums, has_aux=True))
  grads, (out, lse) = fn(q, k, v, sinks, bias, params, mask)
  return (out, lse) + tuple(jax.tree.leaves(grads))


def _golden(q, k, v, sinks, bias, w_out, w_lse, params=None, **kw):
  up = lambda x: None if x is None else jax.tree.map(
      lambda a: a.astype(jnp.float64), x)
  return _value_and_grads('reference', up(q), up(k), up(v), up(sinks),
                          up(bias), w_out, w_lse, params=up(params), **kw)


def _err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  both_inf = np.isneginf(a) & np.isneginf(b)
  diff = np.abs(np.where(both_inf, 0.0, a) - np.where(both_inf, 0.0, b))
  return float(np.max(diff, initial=0.0))


def _assert_close(got, want, dtype, same_dtype=None, rtol=2e-5):
  """float32: absolute tolerance vs the float64 golden; bfloat16: the three-way check
  (kernel error within 2x the bfloat16 reference's error plus a small floor)."""
  assert len(got) == len(want)
  names = ('out', 'lse', 'dq', 'dk', 'dv') + tuple(
      f'extra{i}' for i in range(len(got) - 5))
  for i, (name, g, w) in enumerate(zip(names, got, want)):
    assert not np.any(np.isnan(np.asarray(g, np.float64))), name
    np.testing.assert_array_equal(np.isneginf(np.asarray(g, np.float64)),
                                  np.isneginf(np.asarray(w)), err_msg=name)
    scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(w), w, 0)))))
    if dtype == jnp.float32:
      assert _err(g, w) <= rtol * scale, (name, _err(g, w), scale)
    else:
      ref_err = _err(same_dtype[i], w)
      assert _err(g, w) <= 2.0 * ref_err + 1e-2 * scale, (
          name, _err(g, w), ref_err, scale)


def _check(impl, q, k, v, sinks, bias, w_out, w_lse, **kw):
  got = _value_and_grads(impl, q, k, v, sinks, bias, w_out, w_lse, **kw)
  kw.pop('sizes', None)
  want = _golden(q, k, v, sinks, bias, w_out, w_lse, **kw)
  _assert_close(got, want, jnp.float32)
  return got, want


def _neighborhood(side, radius):
  """2D neighborhood attention on a side x side image: |dr|, |dc| <= radius."""
  r, c = np.divmod(np.arange(side * side), side)
  return ((np.abs(r[:, None] - r[None, :]) <= radius) &
          (np.abs(c[:, None] - c[None, :]) <= radius))


def _per_head_masks(t):
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  causal = k <= q
  strided = causal & ((q - k) % 4 == 0)  # strided heads (Sparse Transformer)
  window = causal & (q - k < 12)  # sliding window
  neighborhood = _neighborhood(int(np.sqrt(t)), 2)
  late = causal & (q >= 20)  # rows 0..19 see nothing
  return np.stack([strided, window, neighborhood, late])


# ------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize('impl', IMPLS)
def test_causal_gqa_softcap_sinks_documents_padding(impl):
  """Causal AND documents (segment ids) AND a traced per-batch mask array, GQA 2:1,
  soft-cap, sinks, T=40 (padded to the 16-block grid)."""
  b, t, n, kh, h = 2, 40, 4, 2, 16
  q, k, v, w_out, w_lse, sinks = _inputs(0, b, t, t, n, kh, h, h, jnp.float32)
  seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [14, 12, 14]),
                              np.repeat([0, 1], [30, 10])]), jnp.int32)
  per_batch = np.random.default_rng(0).random((b, 1, t, t)) < 0.8
  _check(impl, q, k, v, sinks, None, w_out, w_lse, is_causal=True,
         logits_soft_cap=4.0, segment_ids=seg, mask=jnp.asarray(per_batch))


@pytest.mark.parametrize('impl', IMPLS)
def test_per_head_masks_mqa(impl):
  """Strided / sliding-window / 2D-neighborhood / empty-row heads; MQA (K=1);
  a per-head additive bias (its gradient included)."""
  b, t, n, kh, h = 1, 64, 4, 1, 16
  q, k, v, w_out, w_lse, _ = _inputs(1, b, t, t, n, kh, h, 8, jnp.float32)
  bias = jax.random.normal(jax.random.PRNGKey(9), (1, n, t, t), jnp.float32)
  dense = _per_head_masks(t)
  got, _ = _check(impl, q, k, v, None, bias, w_out, w_lse,
                  mask=base.from_array(dense), scale=0.3)
  # Rows that see nothing: zero output, lse = -inf, zero gradient (and no NaN).
  assert np.all(np.asarray(got[0])[:, :20, 3] == 0)
  assert np.all(np.isneginf(np.asarray(got[1])[:, 3, :20]))
  assert np.all(np.asarray(got[2])[:, :20, 3] == 0)
  # Independent NumPy oracle for the forward pass.
  out_np, lse_np = oracles.numpy_attention(q, k, v, scale=0.3, bias=bias,
                                           mask=dense[None])
  assert _err(got[0], out_np) <= 2e-5 and _err(got[1], lse_np) <= 2e-5


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('ratio', [1, 2, 4])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sweep_gqa_ratios_dtypes(impl, ratio, dtype):
  """GQA ratios x dtypes; per-head masks AND causal, soft-cap, sinks."""
  b, t, n, h = 1, 32, 4, 16
  q, k, v, w_out, w_lse, sinks = _inputs(3, b, t, t, n, n // ratio, h, h, dtype)
  dense = _per_head_masks(36)[:, :t, :t]
  kw = dict(mask=base.from_array(dense) & base.causal(t), logits_soft_cap=8.0)
  got = _value_and_grads(impl, q, k, v, sinks, None, w_out, w_lse, **kw)
  want = _golden(q, k, v, sinks, None, w_out, w_lse, **kw)
  same = (None if dtype == jnp.float32 else
          _value_and_grads('reference', q, k, v, sinks, None, w_out, w_lse,
                           **kw))
  if dtype == jnp.bfloat16:
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
  _assert_close(got, want, dtype, same)


@pytest.mark.parametrize('impl', IMPLS)
def test_cross_attention_window_dense_array_bfloat16(impl):
  """T != S, a concrete dense `mask` array compiled into the BlockMask (bottom-right
  sliding window), a per-batch head-shared bias, bfloat16."""
  b, t, s, n, kh, h = 2, 32, 80, 2, 2, 16
  q, k, v, w_out, w_lse, sinks = _inputs(2, b, t, s, n, kh, h, h, jnp.bfloat16)
  bias = jax.random.normal(jax.random.PRNGKey(8), (b, 1, t, s)).astype(
      jnp.bfloat16)
  qi, ki = np.arange(t)[:, None] + (s - t), np.arange(s)[None, :]
  window = jnp.asarray(((ki <= qi) & (qi - ki < 30))[None, None])
  kw = dict(static_mask=window, scale=0.3)
  got = _value_and_grads(impl, q, k, v, sinks, bias, w_out, w_lse, **kw)
  want = _golden(q, k, v, sinks, bias, w_out, w_lse, **kw)
  same = _value_and_grads('reference', q, k, v, sinks, bias, w_out, w_lse,
                          **kw)
  _assert_close(got, want, jnp.bfloat16, same)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('t,s,n,kh,h,hv,mask', [
    (1, 40, 2, 1, 8, 24, None),  # decoding one query; tiny head dim
    (40, 1, 2, 2, 16, 16, None),  # a single key
    (20, 36, 4, 2, 16, 8, base.causal(20, 36)),  # top-left causal, T < S
    (36, 20, 3, 1, 16, 8, base.causal(36, 20, offset=-12)),  # empty rows
])
def test_edge_shapes(impl, t, s, n, kh, h, hv, mask):
  q, k, v, w_out, w_lse, _ = _inputs(6, 1, t, s, n, kh, h, hv, jnp.float32)
  _check(impl, q, k, v, None, None, w_out, w_lse, mask=mask)


@pytest.mark.parametrize('impl', IMPLS)
@hypothesis.settings(max_examples=4)
@hypothesis.given(data=st.data())
def test_random_masks_property(impl, data):
  """Random per-head masks (EMPTY / PARTIAL / FULL tiles), lengths, head ratios,
  tiles and options against the float64 reference."""
  draw = data.draw
  t = draw(st.integers(1, 48), label='t')
  s = draw(st.integers(1, 48), label='s')
  kh = draw(st.sampled_from([1, 2]), label='kh')
  n = kh * draw(st.sampled_from([1, 2]), label='group')
  density = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]), label='density')
  seed = draw(st.integers(0, 2**16), label='seed')
  rng = np.random.default_rng(seed)
  # Block-structured randomness so that whole tiles are empty or full too.
  coarse = rng.random((n, -(-t // 8), -(-s // 8))) < density
  dense = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :t, :s]
  dense &= rng.random((n, t, s)) < draw(st.sampled_from([0.7, 1.0]))
  kw = dict(mask=base.from_array(dense))
  if draw(st.booleans(), label='soft_cap'):
    kw['logits_soft_cap'] = 3.0
  if t == s and draw(st.booleans(), label='segments'):
    kw['segment_ids'] = jnp.asarray(
        np.sort(rng.integers(0, 3, (1, t))), jnp.int32)
  use_sinks = draw(st.booleans(), label='sinks')
  q, k, v, w_out, w_lse, sinks = _inputs(seed, 1, t, s, n, kh, 8, 8,
                                         jnp.float32)
  sinks = sinks if use_sinks else None
  blocks = ([8, 16] if impl == 'pallas_tpu' else [16, 32])
  sizes = MODULES[impl].BlockSizes(block_q=draw(st.sampled_from(blocks)),
                                   block_kv=draw(st.sampled_from(blocks)))
  _check(impl, q, k, v, sinks, None, w_out, w_lse, sizes=sizes, **kw)


# ------------------------------------------------------------------ -inf biases, NaN


@pytest.mark.parametrize('impl', IMPLS)
def test_neg_inf_biases_never_nan(impl):
  """-inf biases: key padding [B, 1, 1, S] (partial rows, a batch whose keys are
  all -inf, whole tiles of -inf), and a [B, N, T, S] bias with -inf rows and tiles,
  together with a mask, sinks on / off, segments and a score_mod; forward and
  gradients vs the float64 reference, no NaN anywhere."""
  b, t, s, n, kh, h = 3, 24, 40, 2, 1, 8
  q, k, v, w_out, w_lse, sinks = _inputs(11, b, t, s, n, kh, h, h, jnp.float32)
  valid = np.array([25, 0, 9])  # batch 1: every key -inf; 2: tiles 1-2 all -inf
  pad = np.where(np.arange(s)[None] < valid[:, None], 0.0, -np.inf)
  key_bias = jnp.asarray(pad[:, None, None, :], jnp.float32)  # [B, 1, 1, S]
  got, _ = _check(impl, q, k, v, None, key_bias, w_out, w_lse,
                  is_causal=True, mask=base.causal(t, s, offset=s - t))
  assert np.all(np.asarray(got[0])[1] == 0) and np.all(np.asarray(got[2])[1] == 0)
  assert np.all(np.isneginf(np.asarray(got[1])[1]))
  full = np.random.default_rng(1).normal(size=(b, n, t, s))
  full[:, :, 5] = -np.inf  # rows where every key is -inf
  full[:, 1, :16, :16] = -np.inf  # whole tiles
  full[0, 0, :, 3::2] = -np.inf  # partial rows
  seg = jnp.asarray(np.repeat([[0, 1]], b, 0).repeat([t // 2, t // 2], 1))
  kv_seg = jnp.asarray(np.repeat([[0, 1]], b, 0).repeat([s // 2, s // 2], 1))
  mod = lambda p, score, b_, h_, qi, ki: score * p  # score_mod with a param
  _check(impl, q, k, v, sinks, jnp.asarray(full, jnp.float32), w_out, w_lse,
         segment_ids=(seg, kv_seg), mod=mod, params=jnp.asarray(0.7, jnp.float32),
         logits_soft_cap=5.0)


@pytest.mark.parametrize('impl', IMPLS)
def test_nan_query_propagates(impl):
  """A NaN in a query row gives NaN in that row's output and lse, other rows exact."""
  q, k, v, _, _, _ = _inputs(12, 1, 16, 16, 2, 2, 8, 8, jnp.float32)
  q = q.at[0, 3, 1, 0].set(jnp.nan)
  problem = problem_lib.make_problem(q, k, v, return_residuals=True)
  out, lse = MODULES[impl].attention(q, k, v, problem, block_sizes=SMALL[impl])
  out, lse = np.asarray(out), np.asarray(lse)
  assert np.all(np.isnan(out[0, 3, 1])) and np.isnan(lse[0, 1, 3])
  want = reference.attention(q.astype(jnp.float64), k.astype(jnp.float64),
                             v.astype(jnp.float64), problem)[0]
  ok = np.ones(out.shape, bool)
  ok[0, 3, 1] = False
  assert _err(out[ok], np.asarray(want)[ok]) <= 2e-5


# ------------------------------------------------------------------ score_mod


def _alibi(params, score, b, h, q_idx, kv_idx):
  """ALiBi (Press et al. 2022) with learnable slopes, written with where (no gather)."""
  slopes = params['slopes']
  heads = jnp.arange(slopes.shape[0], dtype=jnp.int32)
  slope = jnp.sum(jnp.where(heads == h[..., None], slopes, 0.0), axis=-1)
  return score + slope * (kv_idx - q_idx).astype(score.dtype)


def _tanh_cap(params, score, b, h, q_idx, kv_idx):
  return params * jnp.tanh(score / params)


def _rel_pos_table(params, score, b, h, q_idx, kv_idx):
  """T5-style relative position bias from a small table, via a one-hot loop."""
  table = params  # [2R + 1]
  radius = (table.shape[0] - 1) // 2
  rel = jnp.clip(kv_idx - q_idx, -radius, radius) + radius
  out = score
  for r in range(table.shape[0]):
    out = out + jnp.where(rel == r, table[r], 0.0)
  return out


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', ['alibi', 'tanh', 'rel_pos'])
def test_score_mods(impl, name):
  """score_mod forward, lse and grads for q, k, v and the params vs the reference
  (GQA, causal, sinks; the tanh mod also on top of the soft-cap)."""
  b, t, n, kh, h = 2, 24, 4, 2, 8
  q, k, v, w_out, w_lse, sinks = _inputs(13, b, t, t, n, kh, h, h, jnp.float32)
  mod, params, kw = {
      'alibi': (_alibi, {'slopes': jnp.asarray([0.5, 0.25, 0.125, 0.0625],
                                               jnp.float32)}, {}),
      'tanh': (_tanh_cap, jnp.asarray(3.0, jnp.float32),
               {'logits_soft_cap': 6.0}),
      'rel_pos': (_rel_pos_table, jnp.linspace(-1.0, 1.0, 7).astype(jnp.float32),
                  {}),
  }[name]
  got, want = _check(impl, q, k, v, sinks, None, w_out, w_lse, mod=mod,
                     params=params, is_causal=True, **kw)
  assert float(np.max(np.abs(np.asarray(want[-1])))) > 1e-3  # params get gradient


def test_plain_closure_score_mod_refused_on_hardware(monkeypatch):
  """A plain closure indexing a table (vmapped -> gather) runs in interpret mode but
  is refused for Mosaic / Triton, so automatic dispatch falls back to xla; the same
  table written with where / one-hot is accepted."""
  q, k, v, w_out, w_lse, _ = _inputs(14, 1, 16, 16, 1, 1, 8, 8, jnp.float32)
  table = jnp.linspace(-1.0, 1.0, 8).astype(jnp.float32)
  closure = lambda score, b, h, qi, ki: score + table[jnp.clip(ki - qi, 0, 7)]
  problem = problem_lib.make_problem(q, k, v, score_mod=closure)
  out = pallas_tpu.attention(q, k, v, problem, block_sizes=SMALL['pallas_tpu'])
  up = [x.astype(jnp.float64) for x in (q, k, v)]
  want = reference.attention(*up, problem_lib.make_problem(*up, score_mod=closure))
  assert _err(out, want) <= 2e-5
  good = problem_lib.make_problem(
      q, k, v, score_mod=problem_lib.ScoreMod(_rel_pos_table, table[:7]))
  for backend, module in (('tpu', pallas_tpu), ('gpu', pallas_gpu)):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    reason = module.unsupported(q, k, v, problem)
    assert 'gather' in reason and 'where' in reason, reason
    assert api._select(None, backend, (q, k, v), problem) is not module.attention
    with pytest.raises(ValueError, match='gather'):
      api._select(f'pallas_{backend}', backend, (q, k, v), problem)
    if backend == 'tpu':
      assert module.unsupported(q, k, v, good) is None
    else:  # Triton blocks need power-of-two dims: the 7-entry table is refused
      assert 'power-of-two' in module.unsupported(q, k, v, good)
  monkeypatch.setattr(pallas_tpu, 'PARAMS_VMEM_BUDGET', 16)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert 'VMEM' in pallas_tpu.unsupported(q, k, v, good)


# ------------------------------------------------------------------ dropout


@pytest.mark.parametrize('impl', IMPLS)
def test_dropout_matches_reference_and_tiling(impl):
  """Dropout (rate 0.3) with causal GQA, sinks and an ALiBi score_mod: forward and
  grads vs the reference with the same seed; two tilings give the same result."""
  b, t, s, n, kh, h = 2, 24, 40, 2, 1, 8
  q, k, v, w_out, w_lse, sinks = _inputs(15, b, t, s, n, kh, h, h, jnp.float32)
  key = jax.random.key(5)
  kw = dict(dropout_rate=0.3, dropout_key=key, mask=base.causal(t, s, offset=16),
            mod=_alibi, params={'slopes': jnp.asarray([0.3, 0.1], jnp.float32)})
  got, _ = _check(impl, q, k, v, sinks, None, w_out, w_lse, **kw)
  other = MODULES[impl].BlockSizes(block_q=32 if impl == 'pallas_gpu' else 8,
                                   block_kv=32)
  got2 = _value_and_grads(impl, q, k, v, sinks, None, w_out, w_lse, sizes=other,
                          **kw)
  for a, c in zip(got, got2):
    assert _err(a, c) <= 2e-5 * max(1.0, float(np.max(np.abs(
        np.where(np.isfinite(a), a, 0)))))
  no_drop = _value_and_grads(impl, q, k, v, sinks, None, w_out, w_lse,
                             **dict(kw, dropout_rate=0.0, dropout_key=None))
  assert _err(got[0], no_drop[0]) > 1e-2  # dropout changed the output
  np.testing.assert_allclose(got[1], no_drop[1], rtol=1e-5)  # lse undropped


# ------------------------------------------------------------------ dbias reduction


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('shape', [(1, 2, 24, 40), (2, 1, 24, 40),
                                   (2, 1, 1, 40), (1, 1, 1, 40), (2, 2, 24, 1)])
def test_bias_gradient_broadcast_patterns(impl, shape):
  """dbias in the bias's own shape for each broadcast pattern (head-shared,
  batch-shared, key padding, a per-query column), against the reference."""
  b, t, s, n, kh, h = 2, 24, 40, 2, 1, 8
  q, k, v, w_out, w_lse, sinks = _inputs(16, b, t, s, n, kh, h, h, jnp.float32)
  bias = jax.random.normal(jax.random.PRNGKey(17), shape, jnp.float32)
  got, want = _check(impl, q, k, v, sinks, bias, w_out, w_lse,
                     mask=base.causal(t, s, offset=10))
  assert got[-1].shape == shape
  assert float(np.max(np.abs(np.asarray(want[-1])))) > 1e-3


# ------------------------------------------------------------------ vs splash attention


def test_matches_splash_attention():
  """Both kernels agree with JAX splash attention (interpret) on Causal / Local
  heads: the TPU kernel in output and gradients, the GPU kernel in output (its
  gradients are checked against the float64 reference on the same masks)."""
  t, n, h = 128, 2, 128
  q, k, v, w_out, _, _ = _inputs(4, 1, t, t, n, n, h, h, jnp.float32)
  local = splash.LocalMask((t, t), window_size=(32, 0), offset=0)
  heads = splash.MultiHeadMask([splash.CausalMask((t, t)), local])
  sizes = splash.BlockSizes(block_q=128, block_kv=128, block_q_dkv=128,
                            block_kv_dkv=128, block_q_dq=128, block_kv_dq=128)
  kernel = splash.make_splash_mha_single_device(heads, block_sizes=sizes,
                                                interpret=True)
  scale = 1.0 / np.sqrt(h)

  def splash_loss(q, k, v):
    out = jax.vmap(kernel)((q * scale).transpose(0, 2, 1, 3),
                           k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    out = out.transpose(0, 2, 1, 3)  # [B, T, N, H]
    return jnp.sum(out * w_out.astype(jnp.float32)), out

  qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
  ours_mask = base.from_array(np.stack([ki <= qi, (ki <= qi) & (qi - ki <= 32)]))

  def ours_loss(impl, q, k, v):
    problem = problem_lib.make_problem(q, k, v, mask=ours_mask)
    out = MODULES[impl].attention(q, k, v, problem, block_sizes=SMALL[impl])
    return jnp.sum(out * w_out.astype(jnp.float32)), out

  want = _jit(jax.grad(splash_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  got = _jit(jax.grad(functools.partial(ours_loss, 'pallas_tpu'),
                      argnums=(0, 1, 2), has_aux=True))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _err(g, w) <= 2e-5 * max(1.0, float(jnp.max(jnp.abs(w))))
  gpu_out = _jit(functools.partial(ours_loss, 'pallas_gpu'))(q, k, v)[1]
  assert _err(gpu_out, want[1]) <= 2e-5


# ------------------------------------------------------------------ static plan


@hypothesis.given(
    t=st.integers(1, 40), s=st.integers(1, 40), n=st.integers(1, 3),
    bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_plan_tables_match_brute_force(t, s, n, bq, bk, seed, density):
  """Per-head lists hold exactly the non-empty tiles; fetch indices follow them."""
  rng = np.random.default_rng(seed)
  dense = rng.random((n, t, s)) < density
  dense[:, :, :] &= rng.random((n, 1, s)) < 0.8  # some empty columns / tiles
  plan = common.make_plan(base.from_array(dense), bq, bk, n)
  nq, nk = -(-t // bq), -(-s // bk)
  padded = np.zeros((n, nq * bq, nk * bk), bool)
  padded[:, :t, :s] = dense
  tiles = padded.reshape(n, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)
  anyv, allv = tiles.any((3, 4)), tiles.all((3, 4))
  for h in range(n):
    u = plan.head_map[h]
    for i in range(nq):
      cnt = plan.kv_counts[u, i]
      listed = plan.kv_indices[u, i, :cnt]
      np.testing.assert_array_equal(listed, np.nonzero(anyv[h, i])[0])
      for j, kb in enumerate(listed):
        part = plan.kv_part[u, i, j]
        assert (part < 0) == allv[h, i, kb]
        if part >= 0:
          np.testing.assert_array_equal(plan.partial_masks[part],
                                        tiles[h, i, kb])
          assert plan.kv_fetch[u, i, j] == part
      if cnt:  # padding repeats the last block and the last fetched bitmap
        assert np.all(plan.kv_indices[u, i, cnt:] == listed[-1])
        assert np.all(plan.kv_fetch[u, i, cnt:] == plan.kv_fetch[u, i, cnt - 1])
    for kb in range(nk):
      cnt = plan.q_counts[u, kb]
      np.testing.assert_array_equal(plan.q_indices[u, kb, :cnt],
                                    np.nonzero(anyv[h, :, kb])[0])


def test_full_mask_block_classes_exact():
  mask = common.FullMask((10, 7))
  plan = common.make_plan(mask, 4, 4, 2)
  np.testing.assert_array_equal(plan.block_mask.materialize(),
                                np.ones((1, 10, 7), bool))
  assert plan.kv_counts.shape == (1, 3)  # one table row shared by both heads
  np.testing.assert_array_equal(plan.head_map, [0, 0])
  assert plan.kv_part[0, 0, 0] == -1 and plan.has_partial


# ------------------------------------------------------------------ dispatch and errors


def _qkv(t, s=None, n=1, h=8, dtype=jnp.float32):
  return (jnp.zeros((1, t, n, h), dtype), jnp.zeros((1, s or t, 1, h), dtype),
          jnp.zeros((1, s or t, 1, h), dtype))


class _FakeXla:
  """Stands in for the xla implementation in dispatch tests."""

  @staticmethod
  def attention(query, key, value, problem):
    del key, value, problem
    return query


def test_automatic_selection_prefers_pallas_on_accelerators():
  qkv = _qkv(4)
  for kw in ({}, dict(bias=jnp.zeros((1, 1, 4, 4)))):
    problem = problem_lib.make_problem(*qkv, **kw)
    assert api._select(None, 'tpu', qkv, problem) is pallas_tpu.attention
    assert api._select(None, 'gpu', qkv, problem) is pallas_gpu.attention


def test_static_and_dynamic_mask_arrays():
  """Concrete batch-free mask arrays join the BlockMask; others become a -inf bias."""
  b, n, t, s = 2, 3, 5, 6
  rng = np.random.default_rng(0)
  shared = rng.random((1, n, t, s)) < 0.5
  obj = base.causal(t, s)
  assert common.static_mask_array(jnp.asarray(shared))
  assert common.logits_bias(None, jnp.asarray(shared), (b, n, t, s)) is None
  combined = common.effective_mask(obj, jnp.asarray(shared), t, s, n)
  np.testing.assert_array_equal(combined.materialize(),
                                shared[0] & obj.materialize()[None])
  row = rng.random((1, 1, 1, s)) < 0.5  # broadcast over heads and queries
  np.testing.assert_array_equal(
      common.effective_mask(None, jnp.asarray(row), t, s, n).materialize(),
      np.broadcast_to(row[0, 0], (t, s)))
  per_batch = rng.random((b, 1, t, s)) < 0.5
  bias = rng.normal(size=(1, n, t, s)).astype(np.float32)
  assert not common.static_mask_array(jnp.asarray(per_batch))
  got = common.logits_bias(jnp.asarray(bias), jnp.asarray(per_batch),
                           (b, n, t, s))
  np.testing.assert_array_equal(got, np.where(per_batch, bias, -np.inf))
  assert isinstance(common.effective_mask(None, jnp.asarray(per_batch), t, s, n),
                    common.FullMask)
  key_bias = jnp.zeros((b, 1, 1, s))  # a key bias keeps its single query row
  assert common.logits_bias(key_bias, None, (b, n, t, s)).shape == (b, 1, 1, s)


@pytest.mark.parametrize('impl', IMPLS)
def test_hardware_only_errors_and_bad_arguments(impl, monkeypatch):
  q = jnp.ones((1, 128, 2, 16), jnp.float32)
  problem = problem_lib.make_problem(q, q, q)
  with pytest.raises(TypeError, match='block_sizes'):
    MODULES[impl].attention(q, q, q, problem, block_sizes=(128, 128))
  with pytest.raises(TypeError, match='interpret must be a bool or None'):
    MODULES[impl].attention(q, q, q, problem, interpret='yes')
  q64 = q.astype(jnp.float64)
  with pytest.raises(ValueError, match='float64'):
    MODULES[impl].attention(q64, q64, q64, problem_lib.make_problem(q64, q64, q64),
                            interpret=False)
  if impl == 'pallas_tpu':
    with pytest.raises(ValueError, match='multiple of 128'):
      pallas_tpu.attention(q, q, q, problem, interpret=False,
                           block_sizes=pallas_tpu.BlockSizes(block_q=64))
    monkeypatch.setattr(pallas_tpu, 'SMEM_TABLE_BUDGET', 16)
    with pytest.raises(ValueError, match='bytes of SMEM'):
      pallas_tpu.attention(q, q, q, problem, interpret=False)
  else:
    with pytest.raises(ValueError, match='shared memory'):
      pallas_gpu.attention(q, q, q, problem, interpret=False,
                           block_sizes=pallas_gpu.BlockSizes(512, 512))


def test_tpu_smem_budget_steers_dispatch(monkeypatch):
  """On a TPU backend, tables over the SMEM budget: explicit use raises, None falls
  back (lengths known from the query / key shapes)."""
  monkeypatch.setitem(api._REGISTRY, 'xla', _FakeXla)
  qkv = _qkv(1024)
  problem = problem_lib.make_problem(*qkv, is_causal=True)
  assert pallas_tpu.unsupported(*qkv, problem) is None  # CPU: interpret runs all
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert pallas_tpu.unsupported(*qkv, problem) is None  # 8 x 8 tiles fit
  q64 = tuple(x.astype(jnp.float64) for x in qkv)  # the file runs under x64
  assert 'float64' in pallas_tpu.unsupported(
      *q64, problem_lib.make_problem(*q64))
  monkeypatch.setattr(pallas_tpu, 'SMEM_TABLE_BUDGET', 64)
  seg = jnp.zeros((1, 1024), jnp.int32)
  for kw in (dict(is_causal=True), dict(segment_ids=seg),
             dict(bias=jnp.zeros((1, 1, 1024, 1024))), {}):
    case = problem_lib.make_problem(*qkv, **kw)
    assert 'bytes of SMEM' in pallas_tpu.unsupported(*qkv, case)
    assert api._select(None, 'tpu', qkv, case) is _FakeXla.attention
    with pytest.raises(ValueError, match="pallas_tpu.*bytes of SMEM"):
      api._select('pallas_tpu', 'tpu', qkv, case)


def test_gpu_unsupported_steers_dispatch(monkeypatch):
  """On a GPU backend: float64, oversized head dims, shared memory over the limit
  and over-long grids are refused; automatic dispatch then falls back to xla."""
  monkeypatch.setitem(api._REGISTRY, 'xla', _FakeXla)
  qkv = _qkv(64)
  problem = problem_lib.make_problem(*qkv)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert pallas_gpu.unsupported(*qkv, problem) is None
  for dtype in (jnp.float16, jnp.bfloat16):
    ok = _qkv(64, dtype=dtype)
    assert pallas_gpu.unsupported(*ok, problem_lib.make_problem(*ok)) is None
  cases = {'float64': _qkv(64, dtype=jnp.float64),
           'exceeds 256': _qkv(64, h=300),
           'CUDA grid': _qkv(64, n=70000)}
  for reason, arrays in cases.items():
    case = problem_lib.make_problem(*arrays)
    assert reason in pallas_gpu.unsupported(*arrays, case)
    assert api._select(None, 'gpu', arrays, case) is _FakeXla.attention
    with pytest.raises(ValueError, match=f'pallas_gpu.*{reason}'):
      api._select('pallas_gpu', 'gpu', arrays, case)
  # 64 x 64 tiles, head_dim 128, 2 stages, float32: 224 KiB, just under the limit.
  assert pallas_gpu.shared_memory_bytes(pallas_gpu.BlockSizes(), 128, 128, 4) == (
      (64 * 256 * 2 + 64 * 256 + 2 * 64 * 64) * 4) <= pallas_gpu.SHARED_MEMORY_LIMIT
  monkeypatch.setattr(pallas_gpu, 'SHARED_MEMORY_LIMIT', 1024)
  assert 'shared memory' in pallas_gpu.unsupported(*qkv, problem)
  assert api._select(None, 'gpu', qkv, problem) is _FakeXla.attention


def test_block_size_validation():
  with pytest.raises(ValueError, match='block_q must be a positive multiple of 8'):
    pallas_tpu.BlockSizes(block_q=12)
  with pytest.raises(ValueError, match='block_kv must be a positive multiple of 8'):
    pallas_tpu.BlockSizes(block_kv=0)
  with pytest.raises(TypeError, match='block_q must be a positive int'):
    pallas_tpu.BlockSizes(block_q=128.0)
  with pytest.raises(ValueError, match='block_q must be a power of two'):
    pallas_gpu.BlockSizes(block_q=48)
  with pytest.raises(ValueError, match=r'block_kv must be >= 16'):
    pallas_gpu.BlockSizes(block_kv=8)
  with pytest.raises(ValueError, match='num_warps must be a power of two'):
    pallas_gpu.BlockSizes(num_warps=3)


@pytest.mark.parametrize('impl', IMPLS)
def test_explicit_block_sizes_and_default_interpret_on_cpu(impl):
  """Non-default tiles give the same answer (interpret is chosen on CPU); eager
  calls with an equal configuration reuse the compiled kernels."""
  b, t, n, h = 1, 48, 2, 16
  q, k, v, _, _, _ = _inputs(5, b, t, t, n, n, h, h, jnp.float32)
  sizes = (pallas_tpu.BlockSizes(block_q=32, block_kv=8)
           if impl == 'pallas_tpu' else
           pallas_gpu.BlockSizes(block_q=32, block_kv=16, num_warps=4))
  call = lambda: MODULES[impl].attention(
      q, k, v, problem_lib.make_problem(q, k, v, scale=0.25, is_causal=True),
      block_sizes=sizes)
  got = call()
  compiled = common.run._cache_size()  # pylint: disable=protected-access
  np.testing.assert_array_equal(call(), got)  # same mask and options:
  assert common.run._cache_size() == compiled  # no new trace or compile
  want = _jit(functools.partial(api.dot_product_attention, scale=0.25,
                                is_causal=True, implementation='reference'))(
                                    q.astype(jnp.float64), k.astype(jnp.float64),
                                    v.astype(jnp.float64))
  assert _err(got, want) <= 2e-5


# ------------------------------------------------------------------ hardware lowering


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('impl,platform', [('pallas_tpu', 'tpu'),
                                           ('pallas_gpu', 'cuda')])
def test_lowers_for_hardware(impl, platform, dtype):
  """Forward + backward lower to Mosaic (TPU) / Triton (GPU) IR without interpret.

  This runs the Pallas hardware lowering (block-shape, dtype and primitive checks)
  on CPU; the final Mosaic / PTX compilation only happens on a real device.
  """
  b, t, n, kh, h = 1, 256, 4, 2, 128
  q = jnp.ones((b, t, n, h), dtype)
  kv = jnp.ones((b, t, kh, h), dtype)
  seg = jnp.zeros((b, t), jnp.int32)
  mask = base.causal(t) & base.from_array(_per_head_masks(256))

  def loss(q, k, v, sinks, bias):
    problem = problem_lib.make_problem(
        q, k, v, scale=0.1, mask=mask, logits_soft_cap=5.0, sinks=sinks,
        bias=bias, segment_ids=seg)
    out = MODULES[impl].attention(q, k, v, problem, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  text = grad.trace(q, kv, kv, jnp.zeros((n,), jnp.float32),
                    jnp.zeros((1, n, t, t), jnp.bfloat16)).lower(
                        lowering_platforms=(platform,)).as_text()
  marker = 'tpu_custom_call' if platform == 'tpu' else 'xla.gpu.triton'
  assert text.count(marker) == 3  # forward, dq, dk/dv
