"""Tests of the launchers: env parsing, generated commands, a real 2-process run."""

import io
import os
import subprocess
import sys
import textwrap
import time

import pytest

from launch import distributed
from launch import local
from launch import slurm
from launch import tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_cluster_env():
  assert distributed.cluster_env({}) is None
  env = dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_NUM_PROCESSES='2',
             JAX_PROCESS_ID='1')
  assert distributed.cluster_env(env) == dict(
      coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)
  with pytest.raises(ValueError, match='missing'):
    distributed.cluster_env(dict(JAX_NUM_PROCESSES='2'))
  with pytest.raises(ValueError, match='must be integers'):
    distributed.cluster_env(dict(env, JAX_PROCESS_ID='one'))
  with pytest.raises(ValueError, match=r'JAX_PROCESS_ID must be in \[0'):
    distributed.cluster_env(dict(env, JAX_PROCESS_ID='2'))


def test_use_cpu_cores():
  # In this process XLA_FLAGS forces 8 devices (conftest): nothing changes.
  assert distributed.use_cpu_cores() is None
  with pytest.raises(ValueError, match='count must be a positive int'):
    os.environ['XLA_FLAGS'], saved = '', os.environ.get('XLA_FLAGS', '')
    try:
      distributed.use_cpu_cores(0)
    finally:
      os.environ['XLA_FLAGS'] = saved
  # A fresh process gets one device per requested core; set twice is harmless,
  # after the first JAX op the call is a no-op.
  code = textwrap.dedent('''
      from launch import distributed
      assert distributed.use_cpu_cores(3) == 3
      import jax
      print(len(jax.devices()), distributed.use_cpu_cores(2))
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = REPO
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, env=env, cwd=REPO, check=True)
  assert out.stdout.split() == ['3', 'None']


def test_process_env_replaces_device_count():
  env = local.process_env(
      {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --foo'},
      process_id=1, num_processes=3, port=555, devices_per_process=2)
  assert env['JAX_PROCESS_ID'] == '1' and env['JAX_NUM_PROCESSES'] == '3'
  assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:555'
  assert env['XLA_FLAGS'].split() == [
      '--foo', '--xla_force_host_platform_device_count=2']


def test_local_launch_two_processes(tmp_path):
  script = tmp_path / 'worker.py'
  script.write_text(textwrap.dedent('''
      import sys
      import jax, numpy as np
      from launch import distributed
      distributed.initialize()
      from jax.experimental import multihost_utils
      ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
      # One write: gloo's C++ log lines share the pipe and would split a print of
      # several arguments.
      line = f'count {jax.process_count()} {jax.device_count()} {sorted(ids.ravel().tolist())}'
      sys.stdout.write(line + chr(10))
      sys.stdout.flush()
  '''))
  out = io.StringIO()
  env_path = os.environ.get('PYTHONPATH', '')
  os.environ['PYTHONPATH'] = REPO + (os.pathsep + env_path if env_path else '')
  try:
    code = local.launch([sys.executable, str(script)], num_processes=2,
                        devices_per_process=2, timeout=240, out=out)
  finally:
    os.environ['PYTHONPATH'] = env_path
  text = out.getvalue()
  assert code == 0, text
  assert '[p0] count 2 4 [0, 1]' in text and '[p1] count 2 4 [0, 1]' in text


def test_local_launch_failure_propagates():
  code = local.launch([sys.executable, '-c', 'import sys; sys.exit(3)'],
                      num_processes=2, out=io.StringIO())
  assert code == 3
  with pytest.raises(ValueError, match='num_processes must be >= 1'):
    local.launch(['true'], num_processes=0)
  with pytest.raises(ValueError, match='command must be non-empty'):
    local.launch([], num_processes=1)


def test_local_launch_stops_the_others_when_a_nonzero_process_fails():
  """Process 1 failing must stop process 0 at once, not after its own 15 s."""
  out = io.StringIO()
  t0 = time.monotonic()
  code = local.launch(
      ['bash', '-c', 'if [ $JAX_PROCESS_ID = 1 ]; then exit 3; else sleep 15; fi'],
      num_processes=2, out=out, grace_period=1.0)
  elapsed = time.monotonic() - t0
  assert code == 3
  assert elapsed < 8, elapsed
  text = out.getvalue()
  assert 'process 1' in text and 'exit code 3' in text, text
  assert 'stopping' in text, text


def test_local_launch_kills_a_process_that_ignores_sigterm():
  out = io.StringIO()
  t0 = time.monotonic()
  code = local.launch(
      ['bash', '-c', 'if [ $JAX_PROCESS_ID = 0 ]; then sleep 1; exit 5; fi; '
       "trap '' TERM; sleep 20"],
      num_processes=2, out=out, grace_period=1.0)
  elapsed = time.monotonic() - t0
  assert code == 5
  assert 2.0 <= elapsed < 10, elapsed  # 1 s, then the 1 s grace, then SIGKILL.
  assert 'process 0 failed with exit code 5' in out.getvalue()


def test_tpu_pod_commands():
  cmds = tpu_pod.commands(['python', '-m', 'experiments.train', '--x=1 2'],
                          tpu='pod', zone='z', repo_dir='~/a', project='p')
  assert cmds[0][:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod',
                         '--zone=z', '--worker=all']
  assert "pip install -e '.[tpu]'" in cmds[0][-1]
  assert cmds[1][-1] == "cd ~/a && python -m experiments.train '--x=1 2'"
  with pytest.raises(ValueError, match='tpu must be set'):
    tpu_pod.commands(['x'], tpu=None, zone='z', repo_dir='~/a')


def test_slurm_script_is_valid_bash(tmp_path):
  text = slurm.sbatch_script(['python', '-m', 'experiments.train', "--n=it's"],
                             nodes=2, gpus_per_node=4, time='01:00:00',
                             port=1234, partition='gpu')
  assert '#SBATCH --nodes=2' in text and '#SBATCH --partition=gpu' in text
  path = tmp_path / 'job.sbatch'
  path.write_text(text)
  assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
  with pytest.raises(ValueError, match='nodes and gpus_per_node'):
    slurm.sbatch_script(['x'], nodes=0, gpus_per_node=1, time='1', port=1)


def _train_eval_losses(workdir, num_processes, devices):
  out = io.StringIO()
  env_path = os.environ.get('PYTHONPATH', '')
  os.environ['PYTHONPATH'] = REPO + (os.pathsep + env_path if env_path else '')
  try:
    code = local.launch(
        [sys.executable, '-m', 'experiments.train',
         '--config=experiments/configs/lm.py:tiny', f'--workdir={workdir}',
         '--config.train.num_steps=10'],
        num_processes=num_processes, devices_per_process=devices, timeout=400,
        out=out)
  finally:
    os.environ['PYTHONPATH'] = env_path
  text = out.getvalue()
  assert code == 0, text[-3000:]
  losses = [float(line.split("'loss': ")[1].split(',')[0])
            for line in text.splitlines() if 'eval at step 10' in line]
  assert len(losses) == num_processes, text[-3000:]
  return losses


def test_training_binary_two_processes_matches_one(tmp_path):
  """The real training binary on 2 processes x 2 devices (jax.distributed over
  gloo) reaches the same eval loss as 1 process x 4 devices."""
  two = _train_eval_losses(tmp_path / 'two', 2, 2)
  one = _train_eval_losses(tmp_path / 'one', 1, 4)
  assert two[0] == two[1]
  assert abs(two[0] - one[0]) < 1e-4 * abs(one[0]), (two, one)
