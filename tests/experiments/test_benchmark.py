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
