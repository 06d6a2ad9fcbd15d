"""End-to-end tests of `python -m experiments.recalibrate` (its real main): the offline
default (train the tiny preset, then analyse), a trainer checkpoint interrupted and
resumed, a tiny Hugging Face Llama directory, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.recalibration import runner
from tests.experiments.recalibration import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _summary(workdir):
  with open(os.path.join(workdir, runner.SUMMARY_FILE), encoding='utf-8') as f:
    return json.load(f)


def test_offline_default_trains_then_analyses(default_run):
  model_dir = os.path.join(default_run, 'model')
  assert os.path.isdir(os.path.join(model_dir, 'checkpoints', '6'))
  s = _summary(default_run)
  assert s['complete'] and s['model']['kind'] == 'trainer'
  assert s['model']['step'] == 6 and s['model']['trained_on'] == 'mqar'
  assert s['task']['params'] == dict(seq_len=32, num_pairs=4, num_queries=4,
                                     num_keys=16, num_values=16)
  assert s['task']['chance'] == pytest.approx(1 / 16)
  acc = s['accuracy']
  for key in ('baseline', 'calibrated', 'interventions', 'baseline_fast_path'):
    assert 0.0 <= acc[key] <= 1.0
  # 2 layers: the authors' range 2..L-2 is empty, all layers are searched.
  lr = s['act']['layer_range']
  assert lr['layers'] == [0, 1] and 'empty' in lr['note']
  heads = {(l, h): a for l, h, a in s['act']['head_accuracies']}
  assert set(heads) == {(0, 0), (0, 1), (1, 0), (1, 1)}
  assert all(heads[tuple(lh)] > s['act']['calibration_baseline']
             for lh in s['act']['kept_heads'])
  assert np.shape(s['sinks']['first_token_score']) == (2, 2)
  assert np.shape(s['entropy']['per_head']) == (2, 2)
  assert len(s['massive']['model_dims']) == 2 and 'sqrt(D)' in s['massive'][
      'note']
  r = s['retrieval']
  assert r['task'] == 'associative_recall' and r['copies'] == 16
  assert np.shape(r['scores']) == (2, 2)
  assert 'none' in r['masking']
  for name in s['figures']:
    with open(os.path.join(default_run, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert {'sink_first_token.png', 'entropy.png', 'retrieval.png',
          'accuracy.png'} <= set(s['figures'])


def test_interrupted_run_resumes_to_the_same_summary(default_run, tmp_path):
  workdir = str(tmp_path / 'resumed')
  args = [f'--workdir={workdir}',
          f'--checkpoint={os.path.join(default_run, "model")}',
          "--interventions=temperature:t=2,layers=1"] + conftest.RUN_FLAGS
  conftest.run_binary(args + ['--max_heads_per_run=1'])
  assert not os.path.exists(os.path.join(workdir, runner.SUMMARY_FILE))
  lines = open(os.path.join(workdir, runner.HEAD_SEARCH_FILE)).readlines()
  assert len(lines) == 1
  conftest.run_binary(args + ['--max_heads_per_run=2'])
  assert len(open(os.path.join(workdir, runner.HEAD_SEARCH_FILE)).readlines()
            ) == 3
  conftest.run_binary(args)
  resumed = _summary(workdir)
  assert resumed == _summary(default_run)  # As the uninterrupted run.
  conftest.run_binary(args)  # Finished: every stage is skipped.
  assert _summary(workdir) == resumed
  with pytest.raises(SystemExit) as e:  # Other settings, same workdir.
    conftest.run_binary(args[:-1] + ['--num_eval=5'])
  assert e.value.code == 2


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(config).eval()
  directory = str(tmp_path_factory.mktemp('hf_llama'))
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def test_hf_directory(hf_llama, tmp_path):
  workdir = str(tmp_path / 'hf')
  conftest.run_binary([f'--workdir={workdir}', f'--checkpoint={hf_llama}',
                       '--task=needle_copy', '--analysis=sinks,retrieval',
                       '--layers=1', '--task_params=seq_len=16,needle_len=3']
                      + conftest.RUN_FLAGS)
  s = _summary(workdir)
  assert s['model']['kind'] == 'hf' and s['model']['num_heads'] == 4
  assert s['task']['params']['seq_len'] == 16
  assert s['act']['layer_range'] == {'requested': '1', 'layers': [1],
                                     'note': None}
  assert len(s['act']['head_accuracies']) == 4
  assert s['retrieval']['task'] == 'needle_copy'
  assert np.shape(s['retrieval']['scores']) == (2, 4)
  assert 'entropy' not in s and 'massive' not in s
  assert os.path.exists(os.path.join(workdir, 'retrieval.png'))


def _error(args, capsys):
  with pytest.raises(SystemExit) as e:
    conftest.run_binary(args)
  assert e.value.code == 2
  return capsys.readouterr().err


def test_bad_input(default_run, hf_llama, tmp_path, capsys):
  out = f'--workdir={tmp_path / "out"}'
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert 'has no config.json' in _error([out, f'--checkpoint={empty}'], capsys)
  no_ckpt = tmp_path / 'no_ckpt'
  no_ckpt.mkdir()
  (no_ckpt / 'config.json').write_text(json.dumps(
      conftest.tiny_config().to_dict()))
  assert 'no checkpoints' in _error([out, f'--checkpoint={no_ckpt}'], capsys)
  foo = tmp_path / 'foo'
  foo.mkdir()
  cfg = json.load(open(os.path.join(hf_llama, 'config.json')))
  cfg['architectures'] = ['FooForCausalLM']
  (foo / 'config.json').write_text(json.dumps(cfg))
  (foo / 'model.safetensors').write_bytes(
      open(os.path.join(hf_llama, 'model.safetensors'), 'rb').read())
  err = _error([out, f'--checkpoint={foo}'], capsys)
  assert 'FooForCausalLM' in err and 'LlamaForCausalLM' in err
  weightless = tmp_path / 'weightless'
  weightless.mkdir()
  (weightless / 'config.json').write_text(json.dumps(cfg))
  assert 'safetensors' in _error([out, f'--checkpoint={weightless}'], capsys)
  model = f'--checkpoint={os.path.join(default_run, "model")}'
  assert 'out of range' in _error([out, model, '--layers=7'], capsys)
  err = _error([out, model, '--interventions=head_mask:heads=9'], capsys)
  assert 'out of range' in err and 'heads' in err
  err = _error([out, model, '--task=nope'], capsys)
  assert 'associative_recall' in err and 'needle_copy' in err


def test_real_entry_point_reports_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.recalibrate',
       f'--workdir={tmp_path / "out"}', f'--checkpoint={tmp_path / "missing"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2
  assert 'FATAL recalibrate: checkpoint directory' in proc.stderr
  assert 'does not exist' in proc.stderr and 'Traceback' not in proc.stderr
