"""The `routing` benchmark topic: traced calls equal their static twins, and the topic
end to end on its tiny sizes (timing and quality parts)."""

import json
import os

from absl import flags
import numpy as np
import pytest

from experiments import benchmark
from experiments.benchmarks import routing as routing_bench
from tests.experiments import report_checks


@pytest.mark.parametrize('name, cfg', [
    ('moba', dict(q_len=64, block=16, top_k=2)),
    ('vmoba', dict(grid=(2, 8, 8), cell=(1, 4, 4), threshold=0.5, budget=3)),
])
def test_traced_call_equals_its_static_twin(name, cfg):
  """The traced call (routing included) and the static xla call with the same blocks,
  its inner mask and permutation, compute the same attention."""
  method = routing_bench._METHODS[name](dict(cfg, heads=2, head_dim=8))  # pylint: disable=protected-access
  q, k, v = routing_bench._inputs(1, method.q_len, 2, 2, 8)  # pylint: disable=protected-access
  dyn = method.route(q, k)
  if method.inner is not None:
    dyn = dyn.replace(inner=method.inner)
  twin = routing_bench.static_twin(dyn, 2)
  static = routing_bench._static_call(method, twin)(q, k, v)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(method.attend(q, k, v)), np.asarray(static),
                             rtol=2e-5, atol=2e-5)
  assert 0 < float(dyn.density().mean()) < 1  # a real selection, not everything


def test_bad_parts_and_calibration_spec():
  with pytest.raises(ValueError, match='parts must be a non-empty subset'):
    routing_bench.run('quick', '/tmp/unused', parts=('speed',))
  with pytest.raises(ValueError, match='suite must be one of'):
    routing_bench.run('huge', '/tmp/unused')
  with pytest.raises(ValueError, match='calibration mask spec'):
    routing_bench._static_mask('diagonal', 64)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='rounds must be >= 1'):
    routing_bench._time_all([], 0)  # pylint: disable=protected-access


def test_routing_topic_end_to_end_on_tiny_sizes(tmp_path, monkeypatch):
  monkeypatch.setitem(routing_bench.SUITES, 'quick', routing_bench.TINY)
  assert 'routing' in benchmark.available_topics()
  argv = flags.FLAGS(['benchmark', '--suite=quick', f'--workdir={tmp_path}',
                      '--topics=routing'])
  try:
    benchmark.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  rows = json.load(open(os.path.join(tmp_path, 'routing.json')))
  by = {}
  for r in rows:
    by.setdefault(r['section'], []).append(r)
  tiny = routing_bench.TINY
  calibration = routing_bench._CALIBRATION[tiny['calibration']]  # pylint: disable=protected-access
  passes = sum(1 if kind == 'reduce' else 2 for _, kind, *_ in calibration)
  assert len(by['calibration']) == passes
  (const,) = by['constants']
  assert const['constants'] == len(routing_bench.cost_model.FIELDS)
  assert all(const[f'{f}_s_per_unit'] >= 0 for f in routing_bench.cost_model.FIELDS)
  assert {r['name'] for r in by['static']} == {f'zoo_{n}' for n in tiny['zoo']}
  for r in by['calibration'] + by['static'] + by['target']:
    assert r['measured_ms'] > 0 and r['predicted_ms'] > 0
    assert abs(r['predicted_over_measured'] -
               r['predicted_ms'] / r['measured_ms']) < 1e-9
    assert r['within_25pct'] == (abs(r['predicted_over_measured'] - 1) <= 0.25)
  assert 'method_ratio' not in by and not tiny['methods']  # (the target row's path)
  assert {'moba', 'biformer', 'seer_attention', 'vmoba'} <= set(
      routing_bench.available_methods())
  assert len(by['target_ratio']) == 2
  for r in by['target_ratio']:
    assert r['name'] == f'moba_T{tiny["target"]["q_len"]}'
    assert abs(r['traced_over_static'] - r['traced_ms'] / r['static_ms']) < 1e-9
    assert r['met'] == (r['traced_over_static'] <= r['target'])
    assert 0 < r['block_fraction'] <= 2 * tiny['target']['keep']
  quality = by['quality']
  q = routing_bench.QUALITY['tiny']
  assert [r['name'] for r in quality] == ['dense'] + [
      f'{m}_k{k}' for k in q['top_ks'] for m in ('moba', 'seer_attention')]
  assert quality[0]['accuracy_points_vs_dense'] == 0.0
  for r in quality[1:]:  # top_k of the n causal blocks per row, own block included
    n = q['seq_len'] // q['block']
    assert r['block_density'] == sum(min(j + 1, r['top_k']) for j in range(n)) / n**2
    assert r['block_density'] < quality[0]['block_density']
  assert quality[0]['distill_loss_last'] > 0
  for r in quality:
    assert 0.0 <= r['accuracy'] <= 1.0 and r['seq_len'] == q['seq_len']
  assert report_checks.check_report(str(tmp_path), ['routing']) == {'routing': [
      'routing_accuracy_vs_density.png', 'routing_predicted_vs_measured.png']}
  text = open(os.path.join(tmp_path, 'results.md')).read()
  for section in by:
    assert f'### routing: {section} (' in text


def test_module_entry_writes_rows_per_part(tmp_path, monkeypatch):
  """`python -m experiments.benchmarks.routing --parts=...` writes routing_<part>.*
  (the rows themselves are checked end to end above)."""
  calls = []

  def fake_run(suite, workdir, parts):
    calls.append((suite, workdir, tuple(parts)))
    return [dict(section=parts[0], name='x', measured_ms=1.5)]

  monkeypatch.setattr(routing_bench, 'run', fake_run)
  for parts, topic in ((['quality'], 'routing_quality'),
                       (['timing', 'quality'], 'routing')):
    rows = routing_bench.run_and_write('quick', str(tmp_path), parts)
    assert json.load(open(os.path.join(tmp_path, f'{topic}.json'))) == rows
    text = open(os.path.join(tmp_path, f'{topic}.md')).read()
    assert f'### {topic}: {parts[0]} (1 row)' in text
    assert '| name | measured (ms) |' in text
    assert report_checks.check_rectangular(text) == 1
  assert calls == [('quick', str(tmp_path), ('quality',)),
                   ('quick', str(tmp_path), ('timing', 'quality'))]
