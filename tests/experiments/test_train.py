"""End-to-end tests of the training binary and library (experiments.train[_lib]).

The real entry point (`python -m experiments.train`) runs in subprocesses: on each
offline default, on mock tfds data (tfds.testing.mock_data) and killed with SIGKILL
mid-run. Compiled programs are shared through a persistent JAX compilation cache in a
temporary directory, so identical programs compile once per test session.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments import train_lib
from experiments.configs import lm
from experiments.configs import vit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
LM = 'experiments/configs/lm.py'
VIT = 'experiments/configs/vit.py'

# Small and fast: 1 layer for the smoke runs, no TensorBoard unless tested.
SMOKE = {'model.depth': 1, 'train.num_steps': 2, 'train.warmup_steps': 1,
         'train.log_every': 1, 'train.eval_every': 2,
         'train.checkpoint_every': 2, 'data.num_eval_batches': 1}
# The kill-and-resume / sharding run: dropout exercises the RNG in the state.
RESUME = {'model.dropout_rate': 0.1, 'train.num_steps': 24,
          'train.warmup_steps': 2, 'train.log_every': 1, 'train.eval_every': 12,
          'train.checkpoint_every': 4, 'train.tensorboard': False,
          'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module and its subprocesses."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  for name, value in zip(names, (path, 0.0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield path
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _flags(overrides):
  out = []
  for key, value in overrides.items():
    out.append(f'--config.{key}={value}')
  return out


def _config(module, preset, overrides):
  config = module.get_config(preset)
  config.update_from_flattened_dict(dict(overrides))
  return config


def _env(cache_dir):
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return env


# Runs the real `experiments.train.main` once per argv in one process (so JAX and
# TensorFlow are imported once); from the first run marked mock on, under
# tfds.testing.mock_data.
_MULTI_MAIN = """
import json, sys
from absl import flags, logging
from experiments import train
logging.use_absl_handler()
runs, mock_context = json.loads(sys.argv[1]), None
for argv, mock in runs:
  if mock and mock_context is None:
    import tensorflow_datasets as tfds
    mock_context = tfds.testing.mock_data(num_examples=64)
    mock_context.__enter__()  # Kept referenced: active for the rest.
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv = argv
  flags.FLAGS(argv)
  logging.set_verbosity(logging.INFO)
  train.main(argv[:1])
  print('RUN DONE', argv[2], flush=True)  # --workdir=...
"""


def _binary(config_arg, workdir, overrides, cache_dir):
  """Starts the real entry point (`python -m experiments.train`) as a process."""
  cmd = [sys.executable, '-m', 'experiments.train', f'--config={config_arg}',
         f'--workdir={workdir}'] + _flags(overrides)
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _main_runs(runs, cache_dir):
  """Runs `experiments.train.main` for each (config, workdir, overrides, mock tfds)
  in one process; the mocked runs must come last."""
  argvs = [(['train', f'--config={c}', f'--workdir={w}', '--logtostderr'] +
            _flags(o), mock)
           for c, w, o, mock in runs]
  out = subprocess.run(
      [sys.executable, '-c', _MULTI_MAIN, json.dumps(argvs)], cwd=ROOT,
      env=_env(cache_dir),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-4000:]
  return out.stdout


def _rows(workdir, split='train'):
  """{step: row} of metrics.jsonl (last row per step: a resumed run rewrites)."""
  return {r['step']: r for r in metrics_lib.read_metrics(workdir)
          if r['split'] == split}


def _tfds_available():
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def test_binary_trains_on_offline_defaults_and_mock_tfds(tmp_path, jax_cache):
  # bytes and tiny_shakespeare share one compiled program (same shapes).
  offline = [
      ('selective_copy', f'{LM}:tiny', {'data.name': 'selective_copy',
                                        'data.selective_copy.num_copy': 4}),
      ('icl_regression', f'{LM}:tiny', {'data.name': 'icl_regression',
                                        'model.dtype': 'bfloat16'}),
      ('bytes', f'{LM}:tiny', {'data.name': 'bytes', 'data.batch_size': 8}),
      ('bars', f'{VIT}:tiny', {'model.attention.sinks': True,
                               'model.num_kv_heads': 1}),
  ]
  mocked = [('tiny_shakespeare', f'{LM}:tiny',
             {'data.name': 'tiny_shakespeare', 'data.batch_size': 8}),
            ('mnist', f'{VIT}:tiny', {'data.name': 'mnist',
                                      'data.batch_size': 8})]
  runs = [(n, c, o, False) for n, c, o in offline]
  if _tfds_available():
    runs += [(n, c, o, True) for n, c, o in mocked]
  # One process for all runs: JAX and TensorFlow are imported once.
  out = _main_runs([(c, str(tmp_path / n), {**SMOKE, **o}, mock)
                    for n, c, o, mock in runs], jax_cache)
  done = [(n, str(tmp_path / n), out) for n, _, _, _ in runs]
  for name, workdir, out in done:
    train_rows, eval_rows = _rows(workdir), _rows(workdir, 'eval')
    assert sorted(train_rows) == [1, 2], name
    assert sorted(eval_rows) == [2], name
    for key in ('loss', 'accuracy', 'perplexity', 'learning_rate',
                'grad_norm', 'steps_per_sec', 'tokens_per_sec'):
      assert np.isfinite(train_rows[2][key]), (name, key)
    assert train_rows[2]['perplexity'] == pytest.approx(
        np.exp(train_rows[2]['loss']), rel=1e-6)
    assert re.search(r'step 2/2 \| loss .* tokens/s \| ETA', out), name
    assert f'RUN DONE --workdir={workdir}' in out, name
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2')), name
    events = os.listdir(os.path.join(workdir, 'tensorboard', 'train'))
    assert any(e.startswith('events.out.tfevents') for e in events), name


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path, jax_cache):
  config = _config(lm, 'tiny', RESUME)
  full = str(tmp_path / 'full')
  train_lib.train_and_evaluate(config, full)
  want = _rows(full)
  assert sorted(want) == list(range(1, 25))
  # Loss decreases on the recall task.
  first = np.mean([want[s]['loss'] for s in (1, 2, 3)])
  last = np.mean([want[s]['loss'] for s in (22, 23, 24)])
  assert last < first - 0.3, (first, last)

  killed = str(tmp_path / 'killed')
  proc = _binary(f'{LM}:tiny', killed, RESUME, jax_cache)
  deadline = time.time() + 300
  try:
    while True:
      assert proc.poll() is None, 'the run ended before it could be killed'
      assert time.time() < deadline, 'timed out waiting for step 10'
      rows = _rows(killed)
      if rows and max(rows) >= 10:
        break
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGKILL
  steps_before = max(_rows(killed))
  assert steps_before < 24
  # A half-written save (what a crash inside a save leaves) is never picked up.
  ckpt_dir = os.path.join(killed, checkpointing.CHECKPOINT_DIR)
  os.makedirs(os.path.join(ckpt_dir, '100.orbax-checkpoint-tmp-1234', 'state'))
  resumed = train_lib.train_and_evaluate(config, killed)
  assert 4 <= resumed['start_step'] <= steps_before
  assert resumed['start_step'] % 4 == 0
  got = _rows(killed)
  assert sorted(got) == list(range(1, 25))
  for step in want:
    for key in ('loss', 'accuracy', 'grad_norm', 'learning_rate'):
      assert got[step][key] == want[step][key], (step, key)
  assert _rows(killed, 'eval') == _rows(full, 'eval')
  # Rerunning a finished workdir trains nothing more.
  again = train_lib.train_and_evaluate(config, killed)
  assert again['start_step'] == again['final_step'] == 24

  # The same run on one device (and, separately, with gradient accumulation in
  # two microbatches and no dropout) gives the same losses within float tolerance.
  single = str(tmp_path / 'single')
  train_lib.train_and_evaluate(_config(lm, 'tiny', {
      **RESUME, 'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1}), single)
  one = _rows(single)
  for step in want:
    np.testing.assert_allclose(one[step]['loss'], want[step]['loss'],
                               rtol=2e-5, err_msg=f'step {step}')


def test_gradient_accumulation_matches_full_batch(tmp_path, jax_cache):
  del jax_cache
  base = {**SMOKE, 'train.num_steps': 3, 'train.tensorboard': False}
  runs = {}
  for accum in (1, 2):
    workdir = str(tmp_path / f'accum{accum}')
    train_lib.train_and_evaluate(_config(lm, 'tiny', {
        **base, 'train.grad_accum_steps': accum, 'mesh.data': 2}), workdir)
    runs[accum] = _rows(workdir)
  for step in (1, 2, 3):
    for key in ('loss', 'grad_norm', 'accuracy'):
      np.testing.assert_allclose(runs[2][step][key], runs[1][step][key],
                                 rtol=1e-5, err_msg=f'{key} at step {step}')


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path,
                                                              jax_cache):
  del jax_cache
  workdir = str(tmp_path / 'nan')
  config = _config(lm, 'tiny', {
      **SMOKE, 'train.num_steps': 10, 'train.checkpoint_every': 1,
      'train.learning_rate': 1e30, 'train.grad_clip_norm': 0.0,
      'train.tensorboard': False, 'train.eval_every': 100})
  with pytest.raises(train_lib.NonFiniteError,
                     match=r'non-finite training at step (\d+)') as info:
    train_lib.train_and_evaluate(config, workdir)
  bad = int(re.search(r'at step (\d+)', str(info.value)).group(1))
  assert 1 < bad < 10
  assert f'last good checkpoint is step {bad - 1}' in str(info.value)
  ckpt = checkpointing.Checkpointer(workdir, every=1, keep=3)
  try:
    assert ckpt.latest_step() == bad - 1
    trainer = train_lib.Trainer(config, train_lib.data_lib.make_source(
        config.data, seed=0).info)
    state, data_state = ckpt.restore(bad - 1, trainer.abstract_state())
  finally:
    ckpt.close()
  assert data_state == {'position': bad - 1}
  assert int(state['step']) == bad - 1
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state['params']))


def test_config_typos_and_bad_values_are_rejected(tmp_path):
  env = _env(str(tmp_path / 'cache'))
  def run(*args):
    return subprocess.run(
        [sys.executable, '-m', 'experiments.train', f'--workdir={tmp_path}',
         *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
  out = run(f'--config={LM}:tiny', '--config.train.lerning_rate=0.1')
  assert out.returncode != 0
  assert 'closest valid names: learning_rate' in out.stderr
  out = run(f'--config={LM}:tinny')
  assert out.returncode != 0 and "preset must be one of ['icl_regression'" in (
      out.stderr)
  config = lm.get_config('tiny')
  with pytest.raises(AttributeError, match='Did you mean "num_steps"'):
    config.train.num_step = 3
  bad_values = [
      ({'model.attention.mask': 'sliding_windw:4'},
       r"model.attention.mask must name one of \("),
      ({'model.attention.variant': 'softmaxx'},
       r"attention variant must be one of \(.*'softmax'.*\), got 'softmaxx'"),
      ({'data.name': 'shakespear'}, r"data.name must be one of \('mqar'"),
      ({'model.dtype': 'float16'}, "model.dtype must be one of"),
      ({'train.warmup_steps': 100}, r'warmup_steps \(100\) must be <'),
      ({'data.batch_size': 6, 'train.grad_accum_steps': 4},
       r'batch_size \(6\) must be a multiple of train.grad_accum_steps'),
      ({'mesh.data': 3}, r'must be a multiple of the data x fsdp mesh size \(3\)'),
  ]
  for overrides, message in bad_values:
    config = _config(lm, 'tiny', overrides)
    with pytest.raises(ValueError, match=message):
      if 'mesh.data' in overrides:
        train_lib.Trainer(config, train_lib.data_lib.make_source(
            config.data, seed=0).info)
      else:
        train_lib.validate_config(config)
  with pytest.raises(ValueError, match="model.kind='vit' needs image data"):
    train_lib.validate_config(
        _config(vit, 'tiny', {'data.name': 'mqar'}),
        train_lib.data_lib.make_source(lm.get_config('tiny').data, seed=0).info)
  with pytest.raises(ValueError, match='workdir must be a non-empty str'):
    train_lib.train_and_evaluate(lm.get_config('tiny'), '')


def test_every_preset_is_valid():
  for module in (lm, vit):
    for preset in module.PRESETS:
      train_lib.validate_config(module.get_config(preset))
      doc = module.__doc__
      assert f'{preset}:' in doc, (module.__name__, preset)
      assert 'python -m experiments.train --config=' in doc


def test_metrics_writer_validates_and_round_trips(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(3, 'train', {'loss': np.float32(1.5), 'lr': 2})
  with pytest.raises(TypeError, match="metric 'bad' must be a scalar"):
    writer.write(4, 'train', {'bad': 'x'})
  writer.close()
  assert metrics_lib.read_metrics(str(tmp_path)) == [
      {'step': 3, 'split': 'train', 'loss': 1.5, 'lr': 2.0}]
  # A row torn by a kill is skipped, and the next writer starts a fresh line.
  with open(tmp_path / metrics_lib.METRICS_FILE, 'a') as f:
    f.write('{"step": 4, "spl')
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(4, 'train', {'loss': 1.0})
  writer.close()
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path))] == [3, 4]
  with open(tmp_path / metrics_lib.METRICS_FILE) as f:
    assert json.loads(f.readline())['loss'] == 1.5
  progress = metrics_lib.Progress(0, 100)
  line = progress.line(50, {'loss': 2.0, 'steps_per_sec': 10.0,
                            'tokens_per_sec': 1234.0})
  assert line == ('step 50/100 | loss 2 | 10.00 steps/s | 1,234 tokens/s | '
                  'ETA 0:00:05')


def test_benchmark_variants_resolve_and_suite_is_validated():
  from experiments.benchmarks import train as bench  # pylint: disable=g-import-not-at-top
  names = bench.variants()
  assert names['softmax'] == {}
  assert {'softmax+sinks', 'softmax+softcap30', 'gqa(kv=2)', 'mqa(kv=1)',
          'softmax@reference'} <= set(names)
  for overrides in names.values():  # Every benchmarked config is valid.
    config = _config(lm, 'small', overrides)
    train_lib.validate_config(config)
  with pytest.raises(ValueError, match="suite must be one of"):
    bench.run('huge', '')
  rows = [{'variant': 'softmax', 'tokens_per_sec': 1000.0,
           'relative_to_softmax': 1.0}]
  assert 'softmax' in bench.table(rows) and '1.000' in bench.table(rows)


# ----- corrupt checkpoints: fall back to the newest usable one -----

# Two checkpoints (steps 2 and 4) of a one-layer tiny LM; the reference attention
# keeps these tests independent of the optimised kernels.
CORRUPT = {**SMOKE, 'train.num_steps': 4, 'train.eval_every': 100,
           'train.tensorboard': False, 'train.async_checkpointing': False,
           'model.attention.implementation': 'reference'}


def _truncate_largest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir,
                                                                    'state'))
           for f in fs if os.path.basename(r) == 'd']
  for f in files:  # Every array data file: some restores never read some files.
    open(f, 'w').close()


def _remove_manifests(step_dir):
  for r, _, fs in os.walk(os.path.join(step_dir, 'state')):
    for f in fs:
      if f == 'manifest.ocdbt':
        os.remove(os.path.join(r, f))


def _truncate_metadata(step_dir):
  path = os.path.join(step_dir, 'state', '_METADATA')
  with open(path, 'rb+') as f:
    f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    'data_file_truncated': _truncate_largest_data_file,
    'manifest_missing': _remove_manifests,
    'state_missing': lambda d: __import__('shutil').rmtree(
        os.path.join(d, 'state')),
    'metadata_truncated': _truncate_metadata,
    'data_state_truncated': lambda d: open(
        os.path.join(d, 'data', 'metadata'), 'w').close(),
}


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory, jax_cache):
  del jax_cache
  workdir = str(tmp_path_factory.mktemp('two_checkpoints'))
  train_lib.train_and_evaluate(_config(lm, 'tiny', CORRUPT), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return workdir


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_previous(kind, two_checkpoints,
                                                          tmp_path, caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'w')
  shutil.copytree(two_checkpoints, workdir)
  CORRUPTIONS[kind](os.path.join(workdir, 'checkpoints', '4'))
  caplog.set_level('INFO')
  summary = train_lib.train_and_evaluate(_config(lm, 'tiny', CORRUPT), workdir)
  assert summary['start_step'] == 2 and summary['final_step'] == 4
  lines = [r.getMessage() for r in caplog.records
           if 'unusable' in r.getMessage()]
  assert len(lines) == 1, lines
  assert '\n' not in lines[0]
  assert 'checkpoint step 4' in lines[0] and 'falling back to step 2' in lines[0]
  moved = os.path.join(workdir, 'checkpoints_corrupt', '4')
  assert moved in lines[0]
  assert os.path.isdir(moved)  # Kept for inspection, not deleted.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


def test_no_usable_checkpoint_is_one_clear_error(two_checkpoints, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'w')
  shutil.copytree(two_checkpoints, workdir)
  for step in ('2', '4'):
    _remove_manifests(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'no usable checkpoint .*step 4: .*step 2: ') as info:
    train_lib.train_and_evaluate(_config(lm, 'tiny', CORRUPT), workdir)
  assert '\n' not in str(info.value)
  # Nothing was moved or deleted: the user decides.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


class _Records(__import__('logging').Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def test_failed_reads_leave_no_asyncio_reports_behind(two_checkpoints, tmp_path):
  """The orphaned reads of a failed restore are collected later than the restore
  returns; their 'exception was never retrieved' reports must stay muted then too,
  while asyncio's other reports still get through."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'w')
  shutil.copytree(two_checkpoints, workdir)
  for step in ('2', '4'):
    _truncate_largest_data_file(os.path.join(workdir, 'checkpoints', step))
  records = _Records()
  asyncio_logger = logging.getLogger('asyncio')
  asyncio_logger.addHandler(records)
  try:
    with pytest.raises(checkpointing.CheckpointError):
      train_lib.train_and_evaluate(_config(lm, 'tiny', CORRUPT), workdir)
    gc.collect()
    assert not [m for m in records.messages if 'never retrieved' in m], (
        records.messages[0][:500])

    async def fails():
      raise ValueError('an unrelated failure')

    loop = asyncio.new_event_loop()
    task = loop.create_task(fails())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()
    assert any('never retrieved' in m and 'an unrelated failure' in m
               for m in records.messages), records.messages
  finally:
    asyncio_logger.removeHandler(records)


def test_binary_reports_a_corrupt_checkpoint_in_one_line(two_checkpoints,
                                                         tmp_path, jax_cache):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'w')
  shutil.copytree(two_checkpoints, workdir)
  for step in ('2', '4'):
    _truncate_largest_data_file(os.path.join(workdir, 'checkpoints', step))
  proc = _binary(f'{LM}:tiny', workdir, CORRUPT, jax_cache)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert 'no usable checkpoint' in out, out[-3000:]
  assert out.count('no usable checkpoint') == 1, out[-3000:]
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved',
                'never awaited'):
    assert noise not in out, out[-3000:]


def test_resume_keeps_one_metrics_row_per_step(two_checkpoints, tmp_path):
  import collections  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'w')
  shutil.copytree(two_checkpoints, workdir)
  # As if killed after logging steps 3-4 but before checkpoint 4 was written.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  before = metrics_lib.read_metrics(workdir)
  assert sorted(r['step'] for r in before if r['split'] == 'train') == [
      1, 2, 3, 4]
  config = _config(lm, 'tiny', {**CORRUPT, 'train.tensorboard': True})
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary['start_step'] == 2
  rows = metrics_lib.read_metrics(workdir)
  counts = collections.Counter((r['step'], r['split']) for r in rows)
  assert all(n == 1 for n in counts.values()), counts
  assert sorted(s for s, split in counts if split == 'train') == [1, 2, 3, 4]
  # Rows before the checkpoint are the original ones, in order.
  assert rows[:2] == [r for r in before if r['step'] <= 2]


def test_metrics_writer_truncate_after(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  writer.write(3, 'eval', {'loss': 0.5})
  writer.close()
  with open(tmp_path / metrics_lib.METRICS_FILE, 'a') as f:
    f.write('{"step": 4, "spl')  # torn
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False,
                                     resume_step=2)
  writer.write(3, 'train', {'loss': 9.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in metrics_lib.read_metrics(
      str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 9.0)]


def test_unknown_config_field_is_one_line_with_suggestions(tmp_path):
  env = _env(str(tmp_path / 'cache'))
  for arg, want in (('--config.typo=1', "unknown config field 'typo'"),
                    ('--config.data.batch_sise=4',
                     "unknown config field 'data.batch_sise'"),
                    ('--config.modle.dim=4', "unknown config field 'modle'")):
    out = subprocess.run(
        [sys.executable, '-m', 'experiments.train', f'--config={LM}:tiny',
         f'--workdir={tmp_path}', arg], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300)
    assert out.returncode != 0, arg
    assert want in out.stderr, out.stderr[-2000:]
    assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.train', f'--config={LM}:tiny',
       f'--workdir={tmp_path}', '--config.data.batch_sise=4'], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=300)
  assert 'closest valid names: batch_size' in out.stderr, out.stderr[-2000:]


def test_bad_values_name_the_full_field_path(tmp_path):
  for overrides, message in (
      ({'data.batch_size': 0}, r'data.batch_size must be an int >= 1'),
      ({'data.seq_len': 0}, r'data.seq_len must be an int >= 1'),
      ({'model.num_heads': 0}, r'model.num_heads must be an int >= 1'),
      ({'model.dropout_rate': 1.5}, r'model.dropout_rate must be in \[0, 1\)'),
      ({'data.seq_len': 1 << 20}, r'data.seq_len \(1048576\) exceeds'),
  ):
    with pytest.raises(ValueError, match=message):
      train_lib.validate_config(_config(lm, 'tiny', overrides))
  env = _env(str(tmp_path / 'cache'))
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.train', f'--config={LM}:tiny',
       f'--workdir={tmp_path}', '--config.data.batch_size=0'], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert 'data.batch_size must be an int >= 1' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
