"""End-to-end test of `python -m experiments.icl_regression` and its flags."""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

from experiments import icl_regression
from experiments.icl import study

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def _run_main(argv):
  with flagsaver.flagsaver():
    FLAGS.unparse_flags()
    FLAGS(['icl_regression'] + argv)
    icl_regression.main(['icl_regression'])


def test_entry_point_tiny_run_with_interruption_and_resume(tmp_path, capsys):
  """All runs (main + non-isotropic + multi-task), interrupted and resumed: every
  figure (findings 1-4 of the main run, then the extensions) and error curve."""
  workdir = str(tmp_path / 'w')
  argv = [f'--workdir={workdir}', '--preset=tiny', '--n_test=64',
          '--eval_lengths=10,40,60', '--steps=40', '--noniso_steps=20',
          '--multitask_steps=20']
  _run_main(argv + ['--interrupt_after_steps=20'])
  assert 'Interrupted' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  _run_main(argv)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['timing']['runs']['main']['resumed_from'] == 20
  assert summary['timing']['runs']['main']['steps_run'] == 20
  assert summary['figures'] == [
      'fig1_kq_heatmaps.png', 'fig1_2_trajectories.png', 'fig2_ov_vectors.png',
      'fig3_pairing_dummy.png', 'fig4_error_vs_length.png', 'fig5_noniso.png',
      'fig6_multitask.png']
  for name in summary['figures']:
    path = os.path.join(workdir, name)
    assert os.path.getsize(path) > 5000, name
  assert [r['heads'] for r in summary['structure']] == [1, 2]
  errors = summary['error_vs_length']
  assert errors['lengths'] == [10, 40, 60]
  assert set(errors['mean']) == {
      'softmax_H1', 'softmax_H2', 'reduced_H1', 'reduced_H2', 'linear_H1', 'gd',
      'debiased_gd', 'single_head_best', 'ridge'}
  for curve in errors['mean']:
    assert len(errors['mean'][curve]) == 3, curve
  # Ridge is Bayes-optimal: below every other predictor at every length.
  for k, v in errors['mean'].items():
    if k != 'ridge':
      assert all(r <= x * 1.02 for r, x in zip(errors['mean']['ridge'], v)), k
  assert 'noniso' in summary and 'multitask' in summary
  assert os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


@pytest.mark.parametrize('argv,match', [
    (['--heads=0,2'], 'heads'),
    (['--heads=a'], 'comma-separated list of ints'),
    (['--seeds=-1'], 'seeds'),
    (['--steps=30'], 'multiple of log_every'),
    (['--lr=-0.1'], 'lr'),
    (['--sigma2=-1'], 'sigma2'),
    (['--rho=1.5'], 'rho'),
    (['--d=0'], 'd must'),
    (['--eval_lengths=0'], 'eval_lengths'),
    (['--linear_heads=0'], 'linear_heads'),
    (['--checkpoint_every=7'], 'checkpoint_every'),
    (['--n_test=1'], 'n_test'),
    (['--interrupt_after_steps=3'], 'interrupt_after_steps'),
])
def test_bad_flags_rejected(tmp_path, argv, match):
  with pytest.raises(app.UsageError, match=match):
    _run_main([f'--workdir={tmp_path}', '--preset=tiny'] + argv)


def test_missing_workdir_and_bad_preset_exit_nonzero():
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  for argv, match in ((['--preset=tiny'], 'workdir is required'),
                      (['--workdir=/tmp/x', '--preset=huge'], 'preset')):
    proc = subprocess.run(
        [sys.executable, '-m', 'experiments.icl_regression'] + argv,
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode != 0
    assert match in proc.stderr, proc.stderr


def test_build_specs_names_runs():
  from experiments.configs import icl_regression as configs  # pylint: disable=g-import-not-at-top
  specs = study.build_specs(configs.get_config('paper'))
  assert set(specs) == {'main', 'noniso', 'multitask'}
  assert specs['main'].heads == (1, 2, 4, 8) and specs['main'].steps == 500_000
  assert specs['multitask'].task.token_dim == 8
  assert specs['noniso'].task.rho == 0.5
  with pytest.raises(ValueError, match='preset'):
    configs.get_config('huge')


def test_entry_point_unusable_checkpoints_exit_with_one_message(tmp_path):
  """No usable checkpoint: exit 1 with one line, no traceback or asyncio noise."""
  workdir = str(tmp_path / 'w')
  argv = [f'--workdir={workdir}', '--preset=tiny', '--steps=40',
          '--noniso=false', '--multitask=false', '--linear_heads=',
          '--interrupt_after_steps=20']
  _run_main(argv)
  ckpts = os.path.join(workdir, 'checkpoints', 'main')
  for r, _, fs in os.walk(ckpts):
    for f in fs:
      if f == 'manifest.ocdbt':
        os.remove(os.path.join(r, f))
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.icl_regression', *argv[:-1]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stderr.count('no usable checkpoint') == 1, out.stderr[-3000:]
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in out.stderr, out.stderr[-3000:]


def test_summary_keys_uniform_and_closing_list(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  argv = [f'--workdir={workdir}', '--preset=tiny', '--n_test=64',
          '--eval_lengths=10,40', '--noniso=false', '--multitask=false',
          '--heads=1,2,3', '--steps=40', '--seeds=0,1',
          '--interrupt_after_steps=20']
  _run_main(argv)
  capsys.readouterr()
  _run_main(argv[:-1])
  out = capsys.readouterr()
  text = out.out + out.err
  assert 'resumed from step 20' in text, text
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['timing']['runs']['main']['resumed_from'] == 20
  assert summary['timing']['runs']['main']['steps_run'] == 20
  assert 'noniso' not in summary and 'multitask' not in summary  # turned off
  assert len(summary['figures']) == 5
  per_heads = summary['verdicts']['per_heads']
  assert set(per_heads) == {'2', '3'}
  assert len({tuple(sorted(v)) for v in per_heads.values()}) == 1, per_heads
  # Seed-dependent findings are counted over the trained seeds.
  seeds = summary['seeds']
  assert seeds['seeds'] == [0, 1] and seeds['figures_show_seed'] == 0
  assert set(seeds['per_heads']) == {'2', '3'}
  for v in seeds['per_heads'].values():
    assert v['num_seeds'] == 2 and len(v['paired_from_step']) == 2
  # The closing list names every file written, by full path.
  assert 'Wrote:' in out.out
  for name in summary['figures'] + ['summary.json', 'metrics.jsonl']:
    assert os.path.join(workdir, name) in out.out, (name, out.out)


def test_seed_study_counts_pairing_and_dummy_heads_over_seeds():
  # Synthetic histories [R+1, S, N] of (omega, mu) for heads (2, 3), 3 seeds, 4
  # records at log_every=10: seed 0 pairs from step 20, seed 1 never (same sign),
  # seed 2 from step 10; the H=3 model of seed 2 gets a dummy head from step 30.
  omega = np.zeros((4, 3, 5))
  mu = np.zeros((4, 3, 5))
  omega[:, :, :2] = [0.3, 0.2]
  mu[:, :, :2] = [1.0, 0.8]
  omega[2:, 0, 1], mu[2:, 0, 1] = -0.3, -1.0
  omega[1:, 2, 1], mu[1:, 2, 1] = -0.3, -1.0
  omega[:, :, 2:] = [0.3, -0.3, 0.2]
  mu[:, :, 2:] = [1.0, -1.0, 0.5]
  omega[3:, 2, 4], mu[3:, 2, 4] = 1e-3, 1e-3
  res = study.seed_study(omega, mu, heads=(2, 3), log_every=10,
                         seeds=(4, 5, 6))
  assert res['seeds'] == [4, 5, 6]
  h2, h3 = res['per_heads']['2'], res['per_heads']['3']
  assert set(h2) == set(h3)  # Uniform keys for every head count.
  assert h2['num_seeds_paired'] == 2 and h2['paired_seeds'] == [4, 6]
  assert h2['paired_from_step'] == [20, None, 10]
  assert h3['num_seeds_with_dummy_heads'] == 1
  assert h3['dummy_heads_from_step'] == [None, None, 30]
  assert h2['num_seeds_with_dummy_heads'] == 0
