"""VMoBA against brute-force NumPy partitions / global selection and float64."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import routing
from attention.routing import vmoba
from tests.attention.routing import _check


def test_layers_cycle_partitions_and_cells_are_contiguous_blocks():
  assert [vmoba.layer_partition(i) for i in range(5)] == ['1d', '2d', '3d', '1d',
                                                          '2d']
  grid = (2, 4, 6)
  for part, cell in (('1d', (1, 4, 6)), ('2d', (2, 2, 3)), ('3d', (1, 2, 3))):
    perm = vmoba.cell_permutation(grid, cell)
    # Brute force: sort raster tokens by (cell multi-index, position in the cell).
    coords = list(itertools.product(*map(range, grid)))
    key = lambda r: (tuple(c // s for c, s in zip(coords[r], cell)),
                     tuple(c % s for c, s in zip(coords[r], cell)))
    np.testing.assert_array_equal(perm, sorted(range(len(coords)), key=key))
    size = int(np.prod(cell))
    for blk in range(len(perm) // size):  # each block is one cell
      cells = {tuple(c // s for c, s in zip(coords[r], cell))
               for r in perm[blk * size:(blk + 1) * size]}
      assert len(cells) == 1
    assert vmoba.default_cell(grid, part) == {'1d': (1, 4, 6), '2d': (2, 2, 3),
                                              '3d': (1, 2, 3)}[part]
  np.testing.assert_array_equal(vmoba.cell_permutation(grid, (1, 4, 6)),
                                np.arange(48))  # 1D: raster order already


def _brute_global(scores, tau, budget):
  """bool [B, H, n, n]: per head min-max mass, own blocks, descending prefix, cap."""
  b, hm, nq, nk = scores.shape
  out = np.zeros(scores.shape, bool)
  for bi in range(b):
    for h in range(hm):
      s = scores[bi, h]
      span = s.max() - s.min()
      mass = (s - s.min()) / span if span > 0 else np.zeros_like(s)
      chosen = np.eye(nq, nk, dtype=bool)
      taken = mass[chosen].sum()
      pairs = sorted(((j, c) for j in range(nq) for c in range(nk) if j != c),
                     key=lambda p: (-mass[p], p[0] * nk + p[1]))
      for p in pairs:
        if taken >= tau * mass.sum() or mass[p] <= 0:
          break
        chosen[p] = True
        taken += mass[p]
      for j in range(nq):
        row = [j] + sorted((c for c in range(nk) if chosen[j, c] and c != j),
                           key=lambda c: (-mass[j, c], c))
        out[bi, h, j, row[:budget]] = True
  return out


@pytest.mark.parametrize('tau', [0.1, 0.25, 0.6, 1.0])
def test_global_threshold_equals_brute_force(tau):
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 3, 4, 4))
  scores[1, 2] = 1.5  # all equal: mass 0, own blocks only
  for budget in (4, 2):
    m = jax.jit(lambda s: vmoba.global_threshold_blocks(
        s, tau, budget, q_len=32, kv_len=32, block_q=8, block_kv=8,
        always=jnp.eye(4, dtype=bool)))(jnp.asarray(scores, jnp.float32))
    np.testing.assert_array_equal(np.asarray(m.block_matrix()),
                                  _brute_global(scores.astype(np.float32), tau,
                                                budget))


@pytest.mark.parametrize('partition', vmoba.PARTITIONS)
def test_attention_equals_float64_dense_reference_fwd_and_grads(partition):
  grid, n_heads = (2, 4, 4), 2
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 32, n_heads, 4))
  k, v = rng.normal(size=(2, 1, 32, 1, 4))  # GQA: one kv head
  cell = vmoba.default_cell(grid, partition)
  fn = lambda q, k, v: vmoba.vmoba_attention(
      q, k, v, grid=grid, cell=cell, threshold=0.3, implementation='reference')
  with jax.enable_x64(True):
    m = jax.jit(lambda q, k: vmoba.vmoba_mask(
        q, k, block_size=int(np.prod(cell)), threshold=0.3))(
            *(vmoba_lib_permute(x, grid, cell) for x in (q, k)))
  perm = vmoba.cell_permutation(grid, cell)
  # The routing by brute force: block means of the permuted tokens, global pick.
  size = int(np.prod(cell))
  blocks = lambda x: x[:, perm].reshape(1, 32 // size, size, -1, 4).mean(2)
  scores = np.einsum('bjnh,bikh->bnji', blocks(q), blocks(k))  # [B, N, n, n]
  want = _brute_global(scores, 0.3, 32 // size)
  np.testing.assert_array_equal(np.asarray(m.block_matrix()), want)
  assert 0 < want.sum() < want.size  # sparse, not empty
  # Attention: the permuted-order mask put back in raster order.
  dense_perm = np.asarray(m.materialize(n_heads))  # [1, N, T, T] permuted order
  inv = np.argsort(perm)
  dense = dense_perm[:, :, inv][:, :, :, inv]
  _check.assert_matches_dense_oracle(fn, q, k, v, dense)


def vmoba_lib_permute(x, grid, cell):
  return jnp.asarray(x)[:, vmoba.cell_permutation(grid, cell)]


def test_no_retrace_when_only_data_changes_and_module():
  grid = (2, 4, 4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(q, k, v):
    return vmoba.vmoba_attention(q, k, v, grid=grid, cell=(2, 2, 2))

  chex.clear_trace_counter()
  for seed in range(3):
    q, k, v = jax.random.normal(jax.random.PRNGKey(seed), (3, 1, 32, 2, 4))
    assert run(q, k, v).shape == (1, 32, 2, 4)
  layer = routing.VMoBA(grid, layer_index=5)  # 5 % 3 = 2: the 3D partition
  assert layer.partition == '3d' and layer.cell == (1, 2, 2)
  np.testing.assert_array_equal(
      jax.jit(layer)(q, k, v),
      jax.jit(lambda *a: vmoba.vmoba_attention(*a, grid=grid, cell=(1, 2, 2)))(
          q, k, v))


def test_bad_input_names_the_argument():
  q = jnp.zeros((1, 32, 2, 4))
  call = lambda **kw: vmoba.vmoba_attention(**{**dict(
      query=q, key=q, value=q, grid=(2, 4, 4), cell=(2, 2, 2)), **kw})
  for kw, match in (({'cell': (2, 3, 2)}, 'cell .* must divide'),
                    ({'cell': (2, 2)}, 'cell must be 3'),
                    ({'grid': (2, 4, 2)}, 'grid'),
                    ({'threshold': 0.0}, 'threshold'),
                    ({'threshold': 1.5}, 'threshold'),
                    ({'budget': 0}, 'budget'), ({'budget': 5}, 'budget'),
                    ({'heads': 'all'}, 'heads'),
                    ({'key': q[:, :16]}, 'key length')):
    with pytest.raises(ValueError, match=match):
      call(**kw)
  with pytest.raises(ValueError, match='block_size .* must divide'):
    vmoba.vmoba_block_scores(q[:, :30], q[:, :30], block_size=8)
  with pytest.raises(ValueError, match='scores must have shape'):
    vmoba.global_threshold_blocks(jnp.zeros((1, 1, 3, 4)), 0.5, 2, q_len=32,
                                  kv_len=32, block_q=8, block_kv=8)
