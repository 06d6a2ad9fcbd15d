"""The xla time simulator (`kernels.xla.cost_model`): step counts vs brute force over
the plan the kernel runs, monotone predictions, calibration, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import masks
from attention.masks import dynamic as masks_dynamic
from experiments.benchmarks import routing as routing_bench
from kernels.xla import cost_model as cm


def _tile_classes(dense: np.ndarray, bq: int, bk: int) -> np.ndarray:
  """[nq, nk] 0 empty / 1 partial / 2 full from a dense [T, S] mask (padding hidden)."""
  t, s = dense.shape
  nq, nk = -(-t // bq), -(-s // bk)
  padded = np.zeros((nq * bq, nk * bk), bool)
  padded[:t, :s] = dense
  tiles = padded.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
  seen = tiles.sum(axis=(2, 3))
  return np.where(seen == 0, 0, np.where(seen == bq * bk, 2, 1))


def _greedy_chunks(classes_row: np.ndarray, chunk: int) -> tuple[int, int]:
  """(all-FULL chunks, other chunks) covering a row's active tiles, as documented in
  `kernels.xla.plan._chunk_work`: start at the first uncovered active tile, or at
  nk - chunk if it would run past the end; members before that start count EMPTY."""
  nk = len(classes_row)
  active = list(np.nonzero(classes_row)[0])
  full = other = 0
  covered = -1
  for a in active:
    if a <= covered:
      continue
    start = max(0, min(a, nk - chunk))
    members = [classes_row[c] if a <= c < nk else 0
               for c in range(start, start + chunk)]
    if all(m == 2 for m in members):
      full += 1
    else:
      other += 1
    covered = start + chunk - 1
  return full, other


def _brute_counts(classes: np.ndarray, order: np.ndarray, chunk: int) -> cm.StepCounts:
  rows = classes.shape[0]
  per_row = [_greedy_chunks(classes[r], chunk) if chunk > 1 else
             (int((classes[r] == 2).sum()), int((classes[r] == 1).sum()))
             for r in range(rows)]
  full = part = real = total = 0
  for group in order:
    lanes = [per_row[r] if r < rows else (0, 0) for r in group]
    f, p = max(x[0] for x in lanes), max(x[1] for x in lanes)
    full, part = full + f, part + p
    real += sum(x[0] + x[1] for x in lanes)
    total += (f + p) * len(group)
  return cm.StepCounts(full=full, partial=part, lane_steps=real,
                       padding_lane_steps=total - real, groups=len(order))


def _sum_counts(counts):
  return cm.StepCounts(*(sum(getattr(c, f) for c in counts)
                         for f in ('full', 'partial', 'lane_steps',
                                   'padding_lane_steps', 'groups')))


def _tiled_random(heads: int, t: int, s: int, tile: int) -> np.ndarray:
  """bool [heads, t, s]: tiles (of `tile`) empty, full or random, at random."""
  rng = np.random.default_rng(0)
  kind = rng.integers(0, 3, (heads, -(-t // tile), -(-s // tile)))
  up = np.repeat(np.repeat(kind, tile, 1), tile, 2)[:, :t, :s]
  return (up == 2) | ((up == 1) & (rng.random((heads, t, s)) < 0.5))


@pytest.mark.parametrize('mask, heads, options', [
    # fused 256 x 256 forward, 256 x 512 backward tiles; rows of unequal work
    (masks.causal(1024), 2, {}),
    (masks.sliding_window(512, 48, 0), 2, {}),  # kv chunks forward
    # lanes (3 of 4 / 4 of 4 rows: a padding lane), FULL and PARTIAL, kv offset
    (masks.causal(200, 232, offset=32), 2, dict(block_q=64, block_kv=64,
                                                kv_chunk=1, lanes=3)),
    # per-head structures, chunks over EMPTY / FULL / PARTIAL tiles, padding
    (masks.from_array(_tiled_random(3, 100, 84, 8)), 3,
     dict(block_q=16, block_kv=8, kv_chunk=3, lanes=2)),
])
def test_step_counts_equal_brute_force_over_the_plan(mask, heads, options):
  t, s = mask.shape
  sp = cm.static_plan(mask, batch=1, q_len=t, kv_len=s, num_heads=heads,
                      head_dim=16, **options)
  dense = mask.materialize(num_heads=heads)
  for which, plan in (('fwd', sp.fwd), ('bwd', sp.bwd)):
    expected = []
    for grp in plan.groups:
      classes = _tile_classes(dense[grp.heads[0]], plan.block_q, plan.block_kv)
      lists = getattr(grp, which)
      if which == 'bwd':
        expected.append(_brute_counts(classes.T, lists.order, 1))
      else:
        expected.append(_brute_counts(classes, lists.order, plan.kv_chunk))
    assert cm.step_counts(plan, which) == _sum_counts(expected), which
  # The very plan the kernel uses (its cache), at the tiling it picks.
  from kernels import xla  # pylint: disable=g-import-not-at-top
  tiles = {k: v for k, v in options.items() if k != 'lanes'}
  assert (sp.fwd.block_q, sp.fwd.block_kv, sp.fwd.kv_chunk) == xla.tiling_for(
      t, s, mask, head_dim=16, **tiles)


def test_traced_steps_equal_brute_force():
  t, n, kh, block = 96, 4, 2, 16
  nq = t // block
  rng = np.random.default_rng(1)
  for hm, bm, rows_per_step in ((2, 1, None), (2, 1, 10**6), (4, 2, 5), (1, 2, 3)):
    blocks = rng.random((bm, hm, nq, nq)) < 0.4
    dyn = masks_dynamic.from_block_matrix(jnp.asarray(blocks), q_len=t, kv_len=t,
                                          block_q=block, block_kv=block)
    batch = 2
    st = cm.traced_steps(dyn, batch=batch, num_heads=n, num_kv_heads=kh,
                         rows_per_step=rows_per_step)
    counts = blocks.sum(-1)  # [Bm, Hm, nq]
    unit = np.gcd(n // hm, n // kh)
    rows = []
    for b in range(batch):
      for first in range(0, n, unit):  # heads of a unit share the list row, kv head
        heads = range(first, first + unit)
        assert len({h // (n // hm) for h in heads}) == 1
        assert len({h // (n // kh) for h in heads}) == 1
        for qb in range(nq):
          rows.append(int(counts[b % bm, first // (n // hm), qb]))
    if rows_per_step is None:  # the kernel's default
      rows_per_step = cm.default_rows_per_step(dyn, num_heads=n, num_kv_heads=kh)
    step = min(len(rows), rows_per_step)
    if step < len(rows):  # the kernel orders rows by count when it chunks them
      rows = sorted(rows)
    chunks = [rows[i:i + step] for i in range(0, len(rows), step)]
    assert st.unit == unit and st.rows == len(rows) and st.chunks == len(chunks)
    assert st.steps == sum(max(c) for c in chunks)
    assert st.row_steps == sum(max(c) * step for c in chunks)
    assert st.listed == sum(rows)


def _dot_outputs(fn, *args):
  """(elements, FLOPs) of the dot_general outputs in the jaxpr of fn(*args)."""
  elements = flops = 0
  for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      size = int(np.prod(eqn.outvars[0].aval.shape))
      inner = int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
      elements, flops = elements + size, flops + 2 * size * inner
  return elements, flops


def test_anchor_routing_work_counts_the_selection_dots():
  from attention.routing import anchor_attention  # pylint: disable=g-import-not-at-top
  b, t, n, h = 2, 64, 3, 8
  sel = dict(group_size=16, sub_block=4, num_init=8)
  q, k, _ = routing_bench._inputs(b, t, n, n, h)  # pylint: disable=protected-access
  elements, flops = _dot_outputs(
      lambda q, k: anchor_attention.stripe_keys(q, k, **sel), q, k)
  w = cm.anchor_routing_work(batch=b, q_len=t, num_heads=n, head_dim=h, **sel)
  assert w.reduced_logits == elements
  assert w.big_dot_flops + w.small_dot_flops == flops
  for spec in ('init:16', 'local:16'):
    elements, flops = _dot_outputs(
        lambda q, k, s=spec: routing_bench.masked_row_max(q, k, s), q, k)
    w = routing_bench._reduce_work(spec, b, t, n, h)  # pylint: disable=protected-access
    assert (w.reduced_logits, w.big_dot_flops + w.small_dot_flops) == (elements,
                                                                       flops)


def test_permutation_work_counts_the_permuted_arrays():
  b, t, n, kh, h = 1, 32, 4, 2, 8
  w = cm.permutation_work(batch=b, q_len=t, num_heads=n, num_kv_heads=kh, head_dim=h)
  q, k, v = routing_bench._inputs(b, t, n, kh, h)  # pylint: disable=protected-access
  assert w.permuted_elements == q.size + k.size + v.size + q.size  # q, k, v, out
  assert cm.permutation_work(batch=b, q_len=t, num_heads=n, num_kv_heads=kh,
                             head_dim=h, backward=True).permuted_elements == (
                                 2 * w.permuted_elements)
  # The calibration's permuted call: causal attention in the permuted token order.
  perm = np.random.default_rng(0).permutation(t)
  fwd, _ = routing_bench._static_fns(masks.causal(t), perm)  # pylint: disable=protected-access
  q64, k64, v64 = (np.asarray(x, np.float64)[:, perm] for x in (q, k, v))
  kr, vr = (np.repeat(x, n // kh, axis=2) for x in (k64, v64))
  s = np.einsum('btnh,bsnh->bnts', q64, kr) / np.sqrt(h)  # [B, N, T, S]
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  ref = np.einsum('bnts,bsnh->btnh', p / p.sum(-1, keepdims=True), vr)  # [B, T, N, H]
  expect = np.empty_like(ref)
  expect[:, perm] = ref
  np.testing.assert_allclose(np.asarray(fwd(q, k, v)), expect, rtol=2e-5, atol=2e-5)


def test_masked_row_max_equals_numpy_loops():
  b, t, n, h, m = 1, 16, 2, 4, 8
  q, k, _ = routing_bench._inputs(b, t, n, n, h)  # pylint: disable=protected-access
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  init = np.full((b, n, t), -np.inf)
  local = np.full((b, n, t), -np.inf)
  for hd in range(n):
    for i in range(t):
      for j in range(t):
        s = qn[0, i, hd] @ kn[0, j, hd]
        if j < m and j <= i:
          init[0, hd, i] = max(init[0, hd, i], s)
        if j // m == i // m and j <= i:
          local[0, hd, i] = max(local[0, hd, i], s)
  np.testing.assert_allclose(routing_bench.masked_row_max(q, k, f'init:{m}'), init,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(routing_bench.masked_row_max(q, k, f'local:{m}'), local,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='reduce calibration spec'):
    routing_bench.masked_row_max(q, k, 'init:5')


_POSITIVE = cm.Constants(*np.linspace(1.0, 2.0, len(cm.FIELDS)) * 1e-9)


def test_predictions_are_monotone():
  def pred(mask, t=512, heads=2, backward=False):
    sp = cm.static_plan(mask, batch=1, q_len=t, kv_len=t, num_heads=heads,
                        head_dim=32)
    return cm.predict(cm.static_work(sp, backward), _POSITIVE)

  dense, causal = pred(None), pred(masks.causal(512))
  window = pred(masks.sliding_window(512, 64, 0))
  assert window < causal < dense  # fewer visible tiles, less time
  assert pred(masks.causal(512), backward=True) > causal  # fwd+bwd > fwd
  assert pred(masks.causal(1024), t=1024) > causal  # longer
  assert pred(masks.causal(512), heads=4) > causal  # more heads
  # Traced: more listed blocks (a larger budget) cost more; backward adds.
  q = jax.random.normal(jax.random.key(0), (1, 512, 2, 32))
  from attention import routing  # pylint: disable=g-import-not-at-top
  traced = [cm.predict(cm.traced_work(routing.moba_mask(q, q, block_size=64,
                                                        top_k=k),
                                      batch=1, num_heads=2, head_dim=32), _POSITIVE)
            for k in (1, 2, 4, 8)]
  assert traced == sorted(traced) and len(set(traced)) == 4
  dyn = routing.moba_mask(q, q, block_size=64, top_k=2)
  assert cm.predict(cm.traced_work(dyn, batch=1, num_heads=2, head_dim=32,
                                   backward=True), _POSITIVE) > traced[1]


def test_fit_recovers_known_constants_from_synthetic_timings():
  works = [w for c in routing_bench._calibration_timed('small')  # pylint: disable=protected-access
           for w in c.work.values()]
  truth = cm.Constants(calls=3e-4, steps=2e-5, fused_dot_flops=3e-12,
                       big_dot_flops=4e-12, small_dot_flops=7e-12,
                       bwd_dot_flops=5e-12, traced_dot_flops=6e-12, logits=2e-10,
                       masked_logits=1e-10, traced_logits=8e-10,
                       reduced_logits=1e-9, permuted_elements=6e-10, bytes=5e-12)
  seconds = [cm.predict(w, truth) for w in works]
  fit = cm.fit(works, seconds)
  assert fit.rank == len(cm.FIELDS)
  np.testing.assert_allclose(fit.constants.vector(), truth.vector(), rtol=1e-5)
  assert fit.max_rel_err < 1e-6
  # With 2% multiplicative noise the fitted model still predicts within 5%.
  noisy = np.asarray(seconds) * np.random.default_rng(0).uniform(0.98, 1.02,
                                                                 len(seconds))
  fit = cm.fit(works, noisy)
  assert fit.max_rel_err < 0.05


def test_bad_input_raises():
  w = cm.Work(calls=1.0)
  f = len(cm.FIELDS)
  with pytest.raises(ValueError, match='same length'):
    cm.fit([w] * f, [1.0] * (f - 1))
  with pytest.raises(ValueError, match=f'at least {f}'):
    cm.fit([w] * 3, [1.0] * 3)
  with pytest.raises(ValueError, match='finite and > 0'):
    cm.fit([w] * f, [1.0] * (f - 1) + [-1.0])
  with pytest.raises(ValueError, match='non-negative'):
    cm.fit([cm.Work(calls=-1.0)] * f, [1.0] * f)
  with pytest.raises(TypeError, match='Work'):
    cm.predict(1.0, _POSITIVE)
  with pytest.raises(ValueError, match='num_kv_heads must divide'):
    cm.static_plan(None, batch=1, q_len=64, kv_len=64, num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match='q_len must be a positive int'):
    cm.static_plan(None, batch=1, q_len=0, kv_len=64, num_heads=4)
  with pytest.raises(ValueError, match='mask_obj must have shape'):
    cm.static_plan(masks.causal(32), batch=1, q_len=64, kv_len=64, num_heads=4)
  sp = cm.static_plan(None, batch=1, q_len=64, kv_len=64, num_heads=2)
  with pytest.raises(ValueError, match="which must be 'fwd' or 'bwd'"):
    cm.step_counts(sp.fwd, 'sideways')
  dyn = masks_dynamic.from_block_matrix(jnp.ones((1, 1, 2, 2), bool), q_len=32,
                                        kv_len=32, block_q=16, block_kv=16)
  with pytest.raises(ValueError, match='rows_per_step must be a positive int'):
    cm.traced_steps(dyn, batch=1, num_heads=2, rows_per_step=0)
  with pytest.raises(ValueError, match='heads must divide'):
    cm.traced_steps(dyn.replace(kv_indices=jnp.zeros((1, 3, 2, 2), jnp.int32),
                                kv_counts=jnp.ones((1, 3, 2), jnp.int32)),
                    batch=1, num_heads=2)

  def traced(idx, counts):
    cm.traced_steps(dyn.replace(kv_indices=idx, kv_counts=counts), batch=1,
                    num_heads=2)
    return counts

  with pytest.raises(ValueError, match='dyn must be concrete'):
    jax.jit(traced)(dyn.kv_indices, dyn.kv_counts)
