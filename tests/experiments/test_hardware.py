"""End-to-end test of `python -m experiments.benchmarks.hardware` on the CPU preset."""

import json
import math
import os
import types

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from experiments.benchmarks import hardware
from kernels import reference


def _parse(argv):
  fv = flags.FlagValues()
  hardware.define_flags(fv)
  fv(['hardware'] + argv)
  return fv


def test_binary_end_to_end_cpu_smoke(tmp_path):
  """The real flags and entry point; every conformance case passes on both kernels.

  Shrunk from the preset (one length, bfloat16 with its three-way tolerance, one
  timed Pallas kernel, LLVM -O0) to about 25 s: interpret-mode compilation dominates,
  not the shapes. The float32 criterion is exercised by the wrong-kernel test.
  """
  workdir = str(tmp_path)
  fv = _parse([f'--workdir={workdir}', '--preset=cpu_smoke', '--lengths=64',
               '--dtypes=bfloat16', '--timing_kernels=pallas_gpu', '--fast_compile'])
  cfg = hardware.config_from_flags(fv)
  assert cfg.lengths == (64,) and cfg.kernels is None and cfg.fast_compile
  assert cfg.dtypes == ('bfloat16',)
  hardware.run_from_flags(fv)
  results = json.load(open(os.path.join(workdir, 'results.json')))
  meta, conformance, timing = (results['meta'], results['conformance'],
                               results['timing'])
  assert meta['backend'] == 'cpu' and meta['golden'] == 'float64'
  assert meta['kernels'] == ['pallas_gpu', 'pallas_tpu']
  seen = {(r['implementation'], r['case'], r['dtype']) for r in conformance}
  assert seen == {(k, c, d) for k in ('pallas_gpu', 'pallas_tpu')
                  for c in hardware.CASES for d in cfg.dtypes}
  for r in conformance:
    assert r['status'] == 'ok' and r['passed'], r
    for out in ('out', 'lse', 'dq', 'dk', 'dv'):
      assert 0 <= r[f'{out}_err'] <= r[f'{out}_tol'], (r, out)
  assert all('dslopes_err' in r for r in conformance
             if r['case'] == 'alibi_score_mod')
  timed = {(r['structure'], r['dtype'], r['T'], r['implementation'])
           for r in timing}
  contenders = list(hardware.device_kernels(cfg, 'cpu', timing=True)) + [
      'xla', hardware.JAX_NN]
  assert timed == {(s, d, t, c) for s in hardware.STRUCTURES for d in cfg.dtypes
                   for t in cfg.lengths for c in contenders}
  for r in timing:
    assert r['status'] == 'ok', r
    for tag in ('fwd', 'fwd_bwd'):
      assert math.isfinite(r[f'{tag}_ms']) and r[f'{tag}_ms'] > 0, r
      assert math.isfinite(r[f'{tag}_vs_jax_nn']), r
    if r['implementation'] == hardware.JAX_NN:
      assert r['fwd_vs_jax_nn'] == 1.0 and r['fwd_impl'] == 'jax.nn/xla'
  text = open(os.path.join(workdir, 'results.md')).read()
  assert '## Conformance' in text and '| structure |' in text
  assert os.path.exists(os.path.join(workdir, 'timing.csv'))


def _broken(query, key, value, problem):
  """The reference with the logits scale off by 5%: a conformance check must fail."""
  return reference.attention(query, key, value,
                             problem.replace(scale=problem.scale * 1.05))


@pytest.mark.parametrize('golden', ['float64', 'float32_highest'])
def test_conformance_detects_a_wrong_kernel(monkeypatch, golden):
  """float32 rows against both goldens (float32_highest: the device's tolerances)."""
  monkeypatch.setitem(api._REGISTRY, 'hw_broken',
                      types.SimpleNamespace(attention=_broken))
  cfg = hardware.make_config('cpu_smoke', kernels=['reference', 'hw_broken'],
                             cases=['causal'], dtypes=['float32'], golden=golden)
  rows = hardware.run_conformance(cfg, 'cpu', deadline=math.inf)
  by_impl = {r['implementation']: r for r in rows}
  assert by_impl['reference']['passed'] and by_impl['reference']['golden'] == golden
  assert not by_impl['hw_broken']['passed']
  assert by_impl['hw_broken']['out_err'] > by_impl['hw_broken']['out_tol']


def test_budget_skips_rows_and_failures_become_rows(tmp_path, monkeypatch):
  monkeypatch.setitem(api._REGISTRY, 'hw_raises', types.SimpleNamespace(
      attention=lambda *a, **k: (_ for _ in ()).throw(RuntimeError('no kernel'))))
  cfg = hardware.make_config('cpu_smoke', kernels=['hw_raises'], cases=['causal'],
                             dtypes=['float32'], lengths=[16],
                             structures=['causal'])
  rows = hardware.run_conformance(cfg, 'cpu', deadline=math.inf)
  assert rows[0]['status'] == 'failed' and 'no kernel' in rows[0]['error']
  rows = hardware.run_timing(cfg, 'cpu', deadline=math.inf)
  by_impl = {r['implementation']: r for r in rows}
  assert by_impl['hw_raises']['status'] == 'failed'
  assert 'no kernel' in by_impl['hw_raises']['fwd_status']
  assert by_impl['xla']['status'] == 'ok' and by_impl['xla']['fwd_vs_jax_nn'] > 0
  skipped = hardware.run_timing(cfg, 'cpu', deadline=-math.inf)
  assert [r['status'] for r in skipped] == ['skipped'] * 3
  assert all(r['note'] == 'budget_s exceeded' for r in skipped)


@pytest.mark.parametrize('name', hardware.STRUCTURES)
def test_structure_visible_pairs_match_the_dense_mask(name):
  """Each structure's analytic pair count (the FLOP basis) vs the reference's mask."""
  cfg = hardware.make_config('cpu_smoke')
  t = 50
  st = hardware.structure(name, t, cfg)
  problem = api.make_problem(jnp.zeros((1, t, st.heads, 8)),
                             jnp.zeros((1, t, st.kv_heads, 8)),
                             jnp.zeros((1, t, st.kv_heads, 8)), **st.ours,
                             **st.ours_arrays)
  visible = reference.combined_mask(
      mask=problem.mask, mask_obj=problem.mask_obj,
      q_segment_ids=problem.q_segment_ids, kv_segment_ids=problem.kv_segment_ids)
  assert int(np.broadcast_to(np.asarray(visible), (1, 1, t, t)).sum()) == (
      st.visible_pairs)
  # jax.nn's arguments express the same visibility (a -inf logit where hidden).
  q = jax.random.normal(jax.random.key(0), (1, t, st.heads, 8))
  k = jax.random.normal(jax.random.key(1), (1, t, st.kv_heads, 8))
  ours = api.dot_product_attention(q, k, k, implementation='reference', **st.ours,
                                   **st.ours_arrays)
  theirs = jax.nn.dot_product_attention(q, k, k, **st.jax_nn, **st.jax_nn_arrays)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_predicted_memory_skips_dense_logits():
  cfg = hardware.make_config('device')
  st = hardware.structure('causal', 32768, cfg)
  dense = hardware.predicted_bytes('jax.nn/xla', st, 1, 32768, 64, 'float32', True)
  flash = hardware.predicted_bytes('pallas_gpu', st, 1, 32768, 64, 'float32', True)
  assert dense > 8 * 32768**2 * 4 * 4 > flash


def test_interleaved_median_drops_a_failing_callable():
  calls = []

  def bad():
    calls.append(1)
    if len(calls) > 1:
      raise RuntimeError('out of memory')
    return jnp.zeros(())

  medians, errors, rounds = hardware.interleaved_median(
      dict(good=lambda: jnp.ones(()), bad=bad), rounds=3, time_cap_s=60)
  assert set(medians) == {'good'} and medians['good'] > 0 and rounds == 3
  assert 'out of memory' in errors['bad']


def test_bad_config():
  with pytest.raises(ValueError, match='preset must be one of'):
    hardware.make_config('huge')
  with pytest.raises(ValueError, match='dtypes must be among'):
    hardware.make_config('cpu_smoke', dtypes=['float16'])
  with pytest.raises(ValueError, match='kernels must be among'):
    hardware.make_config('cpu_smoke', kernels=['nope'])
  with pytest.raises(ValueError, match='budget_s must be > 0'):
    hardware.make_config('cpu_smoke', budget_s=0.0)
