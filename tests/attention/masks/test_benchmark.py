"""The mask benchmark library runs end to end on its quick suite."""

import json
import os

import pytest

from experiments.benchmarks import masks as bench


def test_quick_suite_rows(tmp_path):
  rows = bench.run('quick', str(tmp_path))
  names = [r['name'] for r in rows]
  assert 'causal_131072_h64' in names and 'neighborhood2d_256x256_w13' in names
  for r in rows:
    assert r['compile_s'] > 0 and r['cached_compile_s'] >= 0
    assert 0 < r['density'] <= r['flop_fraction'] <= 1.0
    assert r['target_s'] > 0 and isinstance(r['meets_target'], bool)
  causal = rows[names.index('causal_131072_h64')]
  assert causal['num_heads'] == 64 and causal['num_unique_heads'] == 1
  json.dumps(rows)  # flat, serialisable
  assert os.path.getsize(tmp_path / 'mask_neighborhood2d_32x32.png') > 0


def test_bad_suite(tmp_path):
  with pytest.raises(ValueError, match='suite'):
    bench.run('huge', str(tmp_path))
