"""End-to-end test of `python -m experiments.benchmark` on the smallest sizes."""

import csv
import json
import os

from absl import flags
import numpy as np
import pytest

from attention import masks
from experiments import benchmark
from experiments.benchmarks import attention as attn_bench
from experiments.benchmarks import common
from experiments.benchmarks import sparse
from tests.experiments import report_checks


@pytest.mark.parametrize('mask', [
    None,
    masks.causal(37, 37),
    masks.causal(20, 41, offset=21),
    masks.causal(37, 37) & ~masks.causal(37, 37, offset=-5),
    masks.from_array(np.random.default_rng(0).random((3, 37, 45)) < 0.3),
])
def test_visible_pairs_equals_brute_force(mask):
  t, s = (37, 37) if mask is None else mask.shape
  heads = 3
  brute = t * s * heads if mask is None else int(
      mask.materialize(num_heads=heads).sum())
  assert attn_bench.visible_pairs(mask, t, s, heads) == brute


def test_flop_count_formula():
  # 2 matmuls of 2 * H FLOPs per visible pair (H = H_v), backward 2.5x more.
  assert attn_bench.attention_flops(10, 2, 4, 4) == 2 * 8 * 10 * 2
  assert attn_bench.attention_flops(10, 2, 4, 4, backward=True) == 3.5 * 320


def test_bad_suite_and_topic():
  with pytest.raises(ValueError, match='suite must be one of'):
    common.check_suite('huge')
  with pytest.raises(ValueError, match='topics must be among'):
    benchmark.run('quick', '/tmp/unused', ['nope'])


def test_binary_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setitem(attn_bench._LENGTHS, 'quick', (32,))
  monkeypatch.setattr(common, 'matmul_flops_per_s', lambda *a, **k: 1e9)
  workdir = str(tmp_path)
  argv = flags.FLAGS(['benchmark', '--suite=quick', f'--workdir={workdir}',
                      '--topics=attention'])
  try:
    benchmark.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  rows = json.load(open(os.path.join(workdir, 'attention.json')))
  with open(os.path.join(workdir, 'attention.csv')) as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  patterns = {r['pattern'] for r in rows}
  assert patterns == set(attn_bench.PATTERNS)
  for r in rows:
    assert r['fwd_s'] > 0 and r['fwd_bwd_s'] > 0
    if r['implementation'] == 'jax.nn':
      assert r['fwd_ratio_vs_jax_nn'] == 1.0
  # One length: no time-vs-length plot, one rectangular table with units.
  assert report_checks.check_report(workdir, ['attention']) == {'attention': []}
  text = open(os.path.join(workdir, 'results.md')).read()
  assert ('| implementation | pattern | S | fwd ratio vs jax.nn (x) | '
          'fwd+bwd ratio vs jax.nn (x) | bwd / fwd (x) | fwd (ms) |') in text


def test_sparse_topic_predicted_vs_measured(monkeypatch):
  monkeypatch.setitem(sparse._LENGTH, 'quick', 256)
  monkeypatch.setattr(common, 'matmul_flops_per_s', lambda *a, **k: 1e9)
  zoo = sparse.mask_zoo(256, 2)
  assert {'causal', 'neighborhood_2d_w13', 's2_attention_64'} <= set(zoo)
  rows = sparse.run('quick', '/tmp/unused', heads=2, head_dim=8,
                    names=['causal', 'documents_4'])
  assert [r['mask'] for r in rows] == ['causal', 'documents_4']
  for r in rows:
    assert r['predicted_speedup'] >= 1.0 and r['measured_speedup'] > 0
    assert 0 < r['density'] <= r['tile_fraction'] <= 1


def test_quality_topic_trains_each_variant(monkeypatch, tmp_path):
  from experiments.benchmarks import quality  # pylint: disable=g-import-not-at-top
  tiny = dict(quality.SUITES['quick'], lengths=(16,), steps=4,
              variants=('softmax', 'mask=sliding_window(L/4)'))
  monkeypatch.setitem(quality.SUITES, 'quick', tiny)
  assert 'mask=sliding_window(L/4)' in quality.variants(16)
  rows = quality.run('quick', str(tmp_path))
  assert [r['variant'] for r in rows] == list(tiny['variants'])
  for r in rows:
    assert 0.0 <= r['eval_accuracy'] <= 1.0 and r['tokens_per_s'] > 0
  assert rows[0]['speed_vs_first'] == 1.0
  assert os.listdir(tmp_path) == []  # run directories are cleaned up


def _attend(q, k, v):
  """A small causal attention with Hv != H, so the output's shape is its own."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = jnp.einsum('btnh,bsnh->bnts', q, k)  # [B, N, T, S]
  t = q.shape[1]
  s = jnp.where(np.tril(np.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum('bnts,bsnv->btnv', jax_nn_softmax(s), v)  # [B, T, N, Hv]


def jax_nn_softmax(x):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.softmax(x, axis=-1)


def test_fwd_bwd_is_the_backward_of_a_run_time_random_cotangent():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((2, 6, 3, 4)), jnp.float32)
          for _ in range(2))
  v = jnp.asarray(rng.standard_normal((2, 6, 3, 5)), jnp.float32)
  g = common.random_cotangent(_attend, q, k, v)
  assert g.shape == (2, 6, 3, 5) and g.dtype == jnp.float32
  assert 0.5 < float(jnp.std(g)) < 1.5  # Not the all-ones of grad(sum).
  np.testing.assert_array_equal(g, common.random_cotangent(_attend, q, k, v))
  fb = common.fwd_bwd_fn(_attend)
  got = fb(q, k, v)
  want = jax.vjp(_attend, q, k, v)[1](g)  # The oracle: jax.vjp directly.
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Only q differentiated, and an extra non-differentiated argument.
  dq, = common.fwd_bwd_fn(lambda q, k, v, c: _attend(q * c, k, v), (0,))(
      q, k, v, 2.0)
  want_q, = jax.vjp(lambda q: _attend(q * 2.0, k, v), q)[1](g)
  np.testing.assert_allclose(dq, want_q, rtol=1e-5, atol=1e-6)
  # The cotangent is an argument of the compiled program (4 inputs, the first of
  # the output's shape), not a constant XLA could fold.
  lowered = fb.lower(q, k, v)
  shapes = [x.shape for x in jax.tree_util.tree_leaves(lowered.args_info)]
  assert shapes == [(2, 6, 3, 5), q.shape, k.shape, v.shape]
  assert common.compiled_memory_bytes(fb, q, k, v) > 0


def test_no_benchmark_times_the_gradient_of_a_sum():
  """grad(sum(f)) gives XLA a constant cotangent; the benchmarks use vjp_fn."""
  import re  # pylint: disable=g-import-not-at-top
  folder = os.path.join(os.path.dirname(common.__file__))
  pattern = re.compile(r'grad\(lambda[^\n]*jnp\.sum\(|loss = lambda[^\n]*jnp'
                       r'\.sum\(fn|return jnp\.sum\(fn\(')
  offenders = []
  for name in sorted(os.listdir(folder)):
    if name.endswith('.py'):
      with open(os.path.join(folder, name), encoding='utf-8') as f:
        if pattern.search(f.read()):
          offenders.append(name)
  assert not offenders, offenders
