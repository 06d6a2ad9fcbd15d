"""Pallas kernels over a traced DynamicBlockMask, in interpret mode.

Oracles: the float64 reference run with the equivalent dense boolean mask built in
NumPy from the block matrix and the inner mask (not from the DynamicBlockMask), for
outputs, lse and gradients (q, k, v, bias, sinks); brute-force NumPy tables for the
dynamic plan (tile classes, bitmap-fetch forward fill, transposed lists); bitwise
equality of runs whose list padding differs; cross-platform lowering to Mosaic /
Triton IR. The conformance base (tests/kernels/conformance.py) runs its dynamic-mask
cases on both kernels too (test_conformance_pallas.py); the cases here cover what
those do not: a head-dependent inner mask (fetch rows beyond the list heads, listed
tiles the inner mask empties), list padding, the plan tables and the errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from attention.masks import dynamic
from kernels import problem as problem_lib
from kernels import reference
from kernels.pallas import common
from kernels.pallas import gpu as pallas_gpu
from kernels.pallas import tpu as pallas_tpu
from tests.kernels.test_pallas import _assert_close

IMPLS = ('pallas_tpu', 'pallas_gpu')
MODULES = {'pallas_tpu': pallas_tpu, 'pallas_gpu': pallas_gpu}
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed, b, t, s, n, kh, h):
  """q, k, v, w_out, w_lse, sinks from NumPy (no per-shape jax.random compiles)."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return (f32(b, t, n, h), f32(b, s, kh, h), f32(b, s, kh, h),
          jnp.asarray(rng.normal(size=(b, t, n, h))),
          jnp.asarray(rng.normal(size=(b, n, t))), f32(n))


def _dense(blocks, t, s, bq, bk, num_heads, inner=None):
  """bool [Bm, N, T, S] from a block matrix [Bm, Hm, nq, nk] and an inner mask."""
  hm = blocks.shape[1]
  rows = np.arange(num_heads) // (num_heads // hm)
  dense = np.repeat(np.repeat(blocks[:, rows], bq, 2), bk, 3)[:, :, :t, :s]
  return dense if inner is None else dense & inner


def _loss(impl, q, k, v, sinks, bias, mask, w_out, w_lse, static_mask=None, **kw):
  """`static_mask` is closed over (concrete), `mask` an argument (traced)."""
  mask = mask if static_mask is None else (mask, static_mask)
  problem = problem_lib.make_problem(q, k, v, sinks=sinks, bias=bias, mask=mask,
                                     return_residuals=True, **kw)
  if impl == 'reference':
    out, lse = reference.attention(q, k, v, problem)
  else:
    out, lse = MODULES[impl].attention(q, k, v, problem)
  finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
  val = (jnp.sum(out.astype(jnp.float64) * w_out) +
         jnp.sum(finite.astype(jnp.float64) * w_lse))
  return val, (out, lse)


def _values_and_grads(impl, q, k, v, sinks, bias, mask, w_out, w_lse, **kw):
  """(out, lse, dq, dk, dv, dsinks, dbias); `mask` is a jit argument (traced)."""
  fn = _jit(jax.grad(functools.partial(_loss, impl, **kw), argnums=(0, 1, 2, 3, 4),
                     has_aux=True))
  grads, (out, lse) = fn(q, k, v, sinks, bias, mask, w_out, w_lse)
  return (out, lse) + tuple(grads)


@pytest.mark.parametrize('impl', IMPLS)
def test_head_dependent_inner_empty_tiles_matches_dense_reference(impl):
  """Per-batch, per-kv-head lists (Bm=B, Hm=K, GQA 4/2) with budget 2 < nk = 3 and
  an empty row, under a head-dependent inner mask (causal / window / anti-causal /
  full) AND a concrete dense mask array (folded into the inner mask): listed tiles
  the inner mask empties are skipped, partial ones read their bitmap, T=40 pads the
  16-block grid; bias, sinks, soft-cap. Forward and grads vs the float64 reference
  with the NumPy dense mask."""
  b, t, n, kh, h, blk = 2, 40, 4, 2, 8, 16
  q, k, v, w_out, w_lse, sinks = _inputs(31, b, t, t, n, kh, h)
  bias = jnp.asarray(np.random.default_rng(32).normal(size=(1, n, t, t)),
                     jnp.float32)
  qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
  inner_dense = np.stack([ki <= qi, np.abs(qi - ki) < 6, ki > qi + 8,
                          np.ones((t, t), bool)])
  blocks = np.array([[[[1, 1, 0], [0, 0, 0], [0, 1, 1]],
                      [[0, 1, 1], [1, 0, 1], [1, 1, 0]]],
                     [[[1, 0, 1], [0, 1, 0], [1, 0, 0]],
                      [[0, 0, 1], [1, 1, 0], [0, 1, 1]]]], bool)  # [B, K, 3, 3]
  dyn = dynamic.from_block_matrix(jnp.asarray(blocks), q_len=t, kv_len=t,
                                  block_q=blk, block_kv=blk, budget=2,
                                  inner=masks.from_array(inner_dense))
  assert dyn.budget == 2 and int(jnp.min(dyn.kv_counts)) == 0
  plan = common.plan_for(problem_lib.make_problem(q, k, v, mask=dyn), t, t, n,
                         blk, blk)  # (without the static array)
  assert plan.has_empty and plan.has_partial
  assert len(plan.pair_rows) == n > dyn.num_heads  # fetch rows per query head
  static = np.random.default_rng(35).random((1, 1, t, t)) < 0.85
  kw = dict(logits_soft_cap=5.0)
  got = _values_and_grads(impl, q, k, v, sinks, bias, dyn, w_out, w_lse,
                          static_mask=jnp.asarray(static), **kw)
  dense = _dense(blocks, t, t, blk, blk, n, inner_dense[None]) & static
  up = lambda x: x.astype(jnp.float64)
  want = _values_and_grads('reference', up(q), up(k), up(v), up(sinks), up(bias),
                           jnp.asarray(dense), w_out, w_lse, **kw)
  _assert_close(got, want, jnp.float32)
  # Batch 0's second q block of kv head 0 lists nothing: without a sink its rows
  # would see nothing; with the sink they return zeros and lse = sink.
  np.testing.assert_array_equal(np.asarray(got[0])[0, 16:32, :2], 0.0)
  np.testing.assert_allclose(np.asarray(got[1])[0, :2, 16:32],
                             np.broadcast_to(np.asarray(sinks)[:2, None], (2, 16)),
                             rtol=1e-6)
  assert float(np.max(np.abs(np.asarray(want[-1])))) > 1e-3  # dbias is exercised


@pytest.mark.parametrize('impl', IMPLS)
def test_padding_past_count_is_never_read_and_lists_do_not_retrace(impl):
  """Steps past a row's count are skipped: list padding pointing anywhere gives
  bitwise the same output and gradients (Bm=1, Hm=N, cross-attention T=24, S=64,
  budget 3 < nk = 4, causal inner); new lists reuse the compiled program."""
  b, t, s, n, kh, h, blk = 1, 24, 64, 2, 1, 8, 16
  q, k, v, w_out, _, _ = _inputs(33, b, t, s, n, kh, h)
  blocks = np.array([[[[1, 0, 1, 0], [0, 1, 1, 1]],
                      [[0, 0, 0, 1], [1, 1, 0, 0]]]], bool)  # [1, N, 2, 4]
  dyn = dynamic.from_block_matrix(jnp.asarray(blocks), q_len=t, kv_len=s,
                                  block_q=blk, block_kv=blk, budget=3)
  pos = np.arange(3)
  junk = np.where(pos < np.asarray(dyn.kv_counts)[..., None],
                  np.asarray(dyn.kv_indices), (pos + 2) % 4).astype(np.int32)
  assert not np.array_equal(junk, np.asarray(dyn.kv_indices))

  def loss(q, k, v, idx, cnt):
    mask = dyn.replace(kv_indices=idx, kv_counts=cnt)
    problem = problem_lib.make_problem(q, k, v, mask=mask,
                                       is_causal=True)  # causal: the inner mask
    out = MODULES[impl].attention(q, k, v, problem)
    return jnp.sum(out.astype(jnp.float64) * w_out), out

  fn = _jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  first = jax.tree.leaves(fn(q, k, v, dyn.kv_indices, dyn.kv_counts))
  second = jax.tree.leaves(fn(q, k, v, jnp.asarray(junk), dyn.kv_counts))
  for a, c in zip(first, second):
    np.testing.assert_array_equal(a, c)
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  up = lambda x: x.astype(jnp.float64)
  dense = _dense(blocks, t, s, blk, blk, n) & (np.arange(s)[None] <=
                                                np.arange(t)[:, None])
  want = _jit(lambda q, k, v, m: reference.attention(
      q, k, v, problem_lib.make_problem(q, k, v, mask=m)))(
          up(q), up(k), up(v), jnp.asarray(dense))
  np.testing.assert_allclose(first[-1], want, atol=2e-5)  # the output


def test_dynamic_plan_tables_match_brute_force():
  """Tile classes of the inner mask, the on-device bitmap-fetch forward fill and
  the transposed lists, against NumPy loops (Bm=2, Hm=2, N=4, per-head inner)."""
  t, s, n, bq, bk = 20, 28, 4, 8, 8
  rng = np.random.default_rng(34)
  inner = rng.random((n, t, s)) < 0.6
  inner[:, :8, 16:] = False  # EMPTY tiles
  inner[:, 8:16, :8] = True  # FULL tiles
  blocks = rng.random((2, 2, 3, 4)) < 0.6
  blocks[1, 0, 2] = False  # an empty row
  dyn = dynamic.from_block_matrix(jnp.asarray(blocks), q_len=t, kv_len=s,
                                  block_q=bq, block_kv=bk,
                                  inner=masks.from_array(inner))
  plan = common.make_dynamic_plan(masks.from_array(inner), bq, bk, n, 2, 2, 4)
  nq, nk = 3, 4
  padded = np.zeros((n, nq * bq, nk * bk), bool)
  padded[:, :t, :s] = inner
  tiles = padded.reshape(n, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)
  for h in range(n):
    u = plan.head_map[h]
    for i in range(nq):
      for kb in range(nk):
        cls = plan.tile[u, i, kb]
        if not tiles[h, i, kb].any():
          assert cls == common.EMPTY_TILE
        elif tiles[h, i, kb].all():
          assert cls == common.FULL_TILE
        else:
          np.testing.assert_array_equal(plan.partial_masks[cls], tiles[h, i, kb])
  opt = dict(kv_indices=dyn.kv_indices, kv_counts=dyn.kv_counts)
  for which, rows in (('kv', nq), ('q', nk)):
    tables = _jit(functools.partial(plan.kernel_tables, which))(opt)
    _, idx, cnt, _, fetch = (np.asarray(a) for a in tables)
    for bm in range(2):
      for h in range(n):
        hm, u, r = h // 2, plan.head_map[h], plan.pair_map[h]
        for i in range(rows):
          listed = (np.nonzero(blocks[bm, hm, i])[0] if which == 'kv' else
                    np.nonzero(blocks[bm, hm, :, i])[0])
          np.testing.assert_array_equal(idx[bm, hm, i, :cnt[bm, hm, i]], listed)
          last = 0
          for j in range(idx.shape[-1]):
            blk = idx[bm, hm, i, j]
            cls = plan.tile[u, i, blk] if which == 'kv' else plan.tile[u, blk, i]
            if j < cnt[bm, hm, i] and cls >= 0:
              last = cls
            assert fetch[bm, r, i, j] == last, (which, bm, h, i, j)
  assert plan.table_bytes() == 4 * max(
      2 * n + 4 * nq * (4 + 1) + plan.tile.size + 2 * len(plan.pair_rows) * nq * 4,
      2 * n + 4 * nk * (3 + 1) + plan.tile.size + 2 * len(plan.pair_rows) * nk * 3)


def _problem(t, blk, **kw):
  q = jnp.ones((1, t, 2, 16), jnp.float32)
  nq = -(-t // blk)
  dyn = dynamic.from_block_matrix(jnp.ones((1, 1, nq, nq), bool), q_len=t,
                                  kv_len=t, block_q=blk, block_kv=blk)
  return q, problem_lib.make_problem(q, q, q, mask=dyn, **kw)


def test_block_sizes_and_hardware_constraints(monkeypatch):
  """The tiles are the mask's blocks: other block_sizes raise; Mosaic needs
  multiples of 128, Triton powers of two >= 16 (reported by unsupported() on that
  backend and raised when compiling, interpret=False); the dynamic tables count
  against the TPU SMEM budget."""
  q, problem = _problem(32, 16)
  for impl, module in MODULES.items():
    assert module.unsupported(q, q, q, problem) is None  # CPU: interpret runs all
    with pytest.raises(ValueError, match=r'block_sizes .* must equal the '
                       r'DynamicBlockMask blocks \(16, 16\)'):
      module.attention(q, q, q, problem,
                       block_sizes=module.BlockSizes(block_q=32, block_kv=32))
  np.testing.assert_allclose(  # equal block sizes are accepted
      pallas_tpu.attention(q, q, q, problem,
                           block_sizes=pallas_tpu.BlockSizes(16, 16)),
      np.ones((1, 32, 2, 16)), rtol=1e-6)
  np.testing.assert_allclose(  # the public API dispatches it (no block_sizes)
      attention.dot_product_attention(q, q, q, mask=problem.block_mask,
                                      implementation='pallas_gpu'),
      np.ones((1, 32, 2, 16)), rtol=1e-6)
  with pytest.raises(ValueError, match='block_q=16 of the DynamicBlockMask .* '
                     'multiple of 128'):
    pallas_tpu.attention(q, q, q, problem, interpret=False)
  q8, problem8 = _problem(32, 8)
  with pytest.raises(ValueError, match='block_q=8 of the DynamicBlockMask .* '
                     'power of two >= 16'):
    pallas_gpu.attention(q8, q8, q8, problem8, interpret=False)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert 'multiple of 128' in pallas_tpu.unsupported(q, q, q, problem)
  q256, problem256 = _problem(256, 128, is_causal=True)
  assert pallas_tpu.unsupported(q256, q256, q256, problem256) is None
  monkeypatch.setattr(pallas_tpu, 'SMEM_TABLE_BUDGET', 64)
  assert 'bytes of SMEM' in pallas_tpu.unsupported(q256, q256, q256, problem256)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert pallas_gpu.unsupported(q, q, q, problem) is None
  assert 'power of two' in pallas_gpu.unsupported(q8, q8, q8, problem8)
  _, problem24 = _problem(48, 24)
  assert 'block_q=24' in pallas_gpu.unsupported(q, q, q, problem24)


@pytest.mark.parametrize('impl,platform', [('pallas_tpu', 'tpu'),
                                           ('pallas_gpu', 'cuda')])
def test_dynamic_lowers_for_hardware(impl, platform):
  """Forward + backward over top-k lists (Bm=B, Hm=K, causal inner: FULL, PARTIAL
  and EMPTY listed tiles) with bias, sinks, segments and soft-cap lower to Mosaic /
  Triton IR on CPU (the final device compilation needs the device)."""
  b, t, n, kh, h = 2, 512, 4, 2, 128
  blk = 128 if impl == 'pallas_tpu' else 64
  nq = t // blk
  q = jnp.ones((b, t, n, h), jnp.bfloat16)
  kv = jnp.ones((b, t, kh, h), jnp.bfloat16)
  seg = jnp.zeros((b, t), jnp.int32)

  def loss(q, k, v, sinks, bias, scores):
    dyn = dynamic.top_k_blocks(scores, 2, q_len=t, kv_len=t, block_q=blk,
                               block_kv=blk)
    problem = problem_lib.make_problem(
        q, k, v, scale=0.1, mask=dyn, is_causal=True, logits_soft_cap=5.0,
        sinks=sinks, bias=bias, segment_ids=seg)
    out = MODULES[impl].attention(q, k, v, problem, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  text = grad.trace(q, kv, kv, jnp.zeros((n,), jnp.float32),
                    jnp.zeros((1, n, t, t), jnp.bfloat16),
                    jnp.zeros((b, kh, nq, nq), jnp.float32)).lower(
                        lowering_platforms=(platform,)).as_text()
  marker = 'tpu_custom_call' if platform == 'tpu' else 'xla.gpu.triton'
  assert text.count(marker) == 3  # forward, dq, dk/dv
