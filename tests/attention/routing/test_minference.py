"""MInference / MMInference patterns vs brute-force NumPy estimation and selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import masks
from attention.routing import minference as mi
from tests import oracles

T = 16
VS = dict(num_vertical=3, num_slash=3, last_q=4, forced_vertical=1,
          forced_slash=1, block_q=4, block_kv=2)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _qkv(seed, b=2, n=2, kh=1, h=4, t=T):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, t, m, h))) for m in (n, kh, kh))


def numpy_vs(q, k, rows, visible, forced_cols, forced_offsets, eligible, nv, ns):
  """Loops: softmax rows, column / diagonal sums, forced first, stable sorts.

  Returns (columns [B, N, nv] sets, offsets [B, N, ns] sets) as Python sets.
  """
  q, k = np.asarray(q), np.asarray(k)
  b, t, n, h = q.shape
  k = np.repeat(k, n // k.shape[2], axis=2)
  s = k.shape[1]
  offsets = list(range(-(s - 1), t))
  cols, slashes = {}, {}
  for bi in range(b):
    for ni in range(n):
      col = np.zeros(s)
      diag = {o: 0.0 for o in offsets}
      for r, i in enumerate(rows):
        z = np.array([q[bi, i, ni] @ k[bi, j, ni] / np.sqrt(h) if visible[r, j]
                      else -np.inf for j in range(s)])
        p = np.exp(z - z.max())
        p /= p.sum()
        for j in range(s):
          col[j] += p[j]
          diag[i - j] += p[j]
      ckey = [(-np.inf if j in forced_cols else -col[j], j) for j in range(s)]
      cols[bi, ni] = {j for _, j in sorted(ckey)[:nv]}
      # Nearer diagonal first on ties: |o|, then o >= 0 before o < 0.
      okey = [(-np.inf if o in forced_offsets else -diag[o], abs(o), o < 0, o)
              for o in offsets if o in eligible]
      slashes[bi, ni] = {o for *_, o in sorted(okey)[:ns]}
  return cols, slashes


def numpy_blocks(cols, offs, t, s, bq, bkv, causal):
  nq, nk = -(-t // bq), -(-s // bkv)
  out = np.zeros((nq, nk), bool)
  for qb in range(nq):
    for i in range(qb * bq, min(t, qb * bq + bq)):
      for o in offs:
        if 0 <= i - o < s:
          out[qb, (i - o) // bkv] = True
      for j in cols:
        if j <= i or not causal:
          out[qb, j // bkv] = True
  return out


def _expand(blocks, bq, bkv, t):
  return np.repeat(np.repeat(blocks, bq, -2), bkv, -1)[..., :t, :t]


def test_vertical_slash_selection_and_blocks_match_brute_force():
  q, k, _ = _qkv(0)
  mask = mi.vertical_slash_mask(q, k, **VS)
  rows = np.arange(T - 4, T)
  visible = np.arange(T)[None] <= rows[:, None]
  cols, offs = numpy_vs(q, k, rows, visible, {0}, {0}, set(range(T)), 3, 3)
  got = np.asarray(mask.block_matrix())
  for (bi, ni), c in cols.items():
    np.testing.assert_array_equal(
        got[bi, ni], numpy_blocks(c, offs[bi, ni], T, T, 4, 2, True),
        err_msg=f'{bi} {ni} {c} {offs[bi, ni]}')
  # Selected indices themselves (not only their blocks).
  rows_out = mi.vertical_slash_scores(q, k, rows=rows, visible=visible)
  off = np.arange(2 * T - 1) - (T - 1)
  v_idx, d_idx = mi.select_vertical_slash(
      *rows_out, num_vertical=3, num_slash=3, forced_vertical=np.arange(T) < 1,
      forced_slash=off == 0, eligible_slash=off >= 0)
  for (bi, ni), c in cols.items():
    assert set(np.asarray(v_idx[bi, ni]).tolist()) == c
    assert set((np.asarray(d_idx[bi, ni]) - (T - 1)).tolist()) == offs[bi, ni]
  assert mask.budget >= int(np.max(mask.kv_counts))


def test_vertical_slash_attention_equals_dense_reference_forward_and_grads():
  q, k, v = _qkv(1)
  blocks = np.asarray(mi.vertical_slash_mask(q, k, **VS).block_matrix())
  dense = _expand(blocks, 4, 2, T) & np.tril(np.ones((T, T), bool))
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=dense)
  fn = lambda q, k, v: mi.vertical_slash_attention(q, k, v, implementation='reference',
                                                   **VS)
  np.testing.assert_allclose(fn(q, k, v), want, atol=1e-10)
  np.testing.assert_allclose(mi.vertical_slash_attention(q, k, v, **VS), want,
                             atol=1e-10)
  dout = jnp.asarray(np.random.default_rng(2).normal(size=want.shape))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * dout), argnums=(0, 1, 2)))(
      q, k, v)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=0.5, mask=dense)
  for g, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(g, ref[name], atol=1e-10, err_msg=name)


def test_block_sparse_and_a_shape():
  q, k, _ = _qkv(3)
  mask = mi.block_sparse_mask(q, k, top_k=2, block_q=4, block_kv=4)
  qn, kn = np.asarray(q), np.repeat(np.asarray(k), 2, axis=2)
  for bi in range(2):
    for ni in range(2):
      qp = qn[bi, :, ni].reshape(4, 4, 4).mean(1)
      kp = kn[bi, :, ni].reshape(4, 4, 4).mean(1)
      for qb in range(4):
        sc = [(-np.inf if kb == qb else -(qp[qb] @ kp[kb]), kb)
              for kb in range(qb + 1)]
        want = sorted(kb for _, kb in sorted(sc)[:2])
        got = np.asarray(mask.kv_indices[bi, ni, qb, :mask.kv_counts[bi, ni, qb]])
        np.testing.assert_array_equal(got, want)
  shape = mi.a_shape(T, num_sinks=2, window=3)
  np.testing.assert_array_equal(shape.materialize(),
                                masks.sink_window(T, 2, 3).materialize())


MODALITY = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0])


def test_modality_permutation_and_attention_equal_the_original_order_reference():
  perm, segments = mi.modality_permutation(MODALITY)
  np.testing.assert_array_equal(MODALITY[perm], np.sort(MODALITY))
  text = perm[:8]
  assert list(text) == sorted(text)  # stable: order kept inside a modality
  assert segments == [(0, 8), (8, 16)]
  q, k, v = _qkv(4)
  mm = dict(VS, num_slash=4)
  mask, perm2 = mi.modality_vertical_slash_mask(q, k, MODALITY, **mm)
  np.testing.assert_array_equal(perm2, perm)
  # Selection in the permuted layout equals brute force (rows: last 4 per segment,
  # causal in original positions, forced column = original token 0).
  qp, kp = (np.asarray(x)[:, perm] for x in (q, k))
  rows = np.concatenate([np.arange(4, 8), np.arange(12, 16)])
  visible = perm[None] <= perm[rows][:, None]
  cols, offs = numpy_vs(qp, kp, rows, visible, {int(np.argmax(perm == 0))}, {0},
                        set(range(-(T - 1), T)), 3, 4)
  blocks = np.asarray(mask.block_matrix())
  for (bi, ni), c in cols.items():
    np.testing.assert_array_equal(
        blocks[bi, ni], numpy_blocks(c, offs[bi, ni], T, T, 4, 2, False))
  # Attention == original-order reference with the pattern mapped back.
  pos = np.argsort(perm)  # permuted position of each original token
  dense = (_expand(blocks, 4, 2, T)[:, :, pos][:, :, :, pos] &
           np.tril(np.ones((T, T), bool)))
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=dense)
  got = mi.modality_vertical_slash_attention(q, k, v, MODALITY,
                                             implementation='reference', **mm)
  np.testing.assert_allclose(got, want, atol=1e-10)


def test_bad_input_names_the_argument():
  q, k, v = _qkv(5)
  with pytest.raises(ValueError, match=r'num_vertical must be in \[1, 16\]'):
    mi.vertical_slash_mask(q, k, **{**VS, 'num_vertical': 17})
  with pytest.raises(ValueError, match='num_slash must be an int >= 1'):
    mi.vertical_slash_mask(q, k, **{**VS, 'num_slash': 0})
  with pytest.raises(ValueError, match='block_q must be an int >= 1'):
    mi.vertical_slash_mask(q, k, **{**VS, 'block_q': 0})
  with pytest.raises(ValueError, match='key must have shape'):
    mi.vertical_slash_mask(q, k[:, :8], **VS)
  with pytest.raises(ValueError, match='modality must have length T = 16'):
    mi.modality_vertical_slash_mask(q, k, MODALITY[:8], **VS)
  with pytest.raises(ValueError, match='modality must be a non-empty 1-D'):
    mi.modality_permutation(np.zeros((2, 2), int))
  with pytest.raises(ValueError, match='k must be in'):
    mi.block_sparse_mask(q, k, top_k=5, block_q=4, block_kv=4)
  del v



def test_registry_variant_is_the_library_pattern():
  from experiments.models import registry  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(6, t=32)
  pattern = mi.registry_pattern(32)
  assert pattern['block_q'] == 4 and pattern['num_vertical'] == 4
  fn = registry.get_variant('minference')
  got, aux = fn(q, k, v, mask=None, is_causal=True, sinks=None,
                logits_soft_cap=None, implementation='reference')
  want = mi.vertical_slash_attention(q, k, v, implementation='reference', **pattern)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert aux == {}
  with pytest.raises(ValueError, match='causal only'):
    fn(q, k, v, mask=None, is_causal=False, sinks=None, logits_soft_cap=None,
       implementation=None)
