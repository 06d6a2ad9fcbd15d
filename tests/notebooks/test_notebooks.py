"""The notebooks in notebooks/: stripped, Colab-ready, and executed headless in CI.

Every notebook runs top to bottom with nbclient on a kernel of this interpreter, with
its small settings: `QUICK = True` and `WORKDIR` (under tmp_path) are injected in a
new cell right after the cell tagged `parameters` (papermill's convention). A cell
that raises fails the test; the executed notebook (with outputs) is written to
tmp_path, never over the repository's copy.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import resource
import sys
import time
from typing import Any

from jupyter_client import kernelspec
from jupyter_client import manager
import nbclient
from nbclient import exceptions as nbclient_exceptions
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / 'notebooks'
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob('*.ipynb'))
ORG = 'attnlab'
KERNEL_NAME = 'attnlab-test-python'
CELL_TIMEOUT_S = 600


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def parameter_cell_index(nb: nbformat.NotebookNode) -> int:
  """Index of the one code cell tagged 'parameters'."""
  found = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and
           'parameters' in c.get('metadata', {}).get('tags', [])]
  if len(found) != 1:
    raise ValueError(f'a notebook must have exactly one code cell tagged '
                     f'"parameters", found {len(found)}.')
  return found[0]


def inject_parameters(nb: nbformat.NotebookNode,
                      parameters: dict[str, Any]) -> nbformat.NotebookNode:
  """A copy of `nb` with `NAME = repr(value)` lines in a new cell tagged
  'injected-parameters' right after the 'parameters' cell (as papermill does)."""
  nb = nbformat.from_dict(json.loads(json.dumps(nb)))
  index = parameter_cell_index(nb)
  source = '# Parameters injected by tests/notebooks/test_notebooks.py\n' + ''.join(
      f'{name} = {value!r}\n' for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source.rstrip('\n'),
                                   metadata={'tags': ['injected-parameters']})
  nb.cells.insert(index + 1, cell)
  return nb


def kernel_manager(spec_dir: pathlib.Path) -> manager.KernelManager:
  """A kernel manager whose only kernelspec runs ipykernel on `sys.executable`."""
  path = spec_dir / KERNEL_NAME
  path.mkdir(parents=True, exist_ok=True)
  (path / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'attnlab test kernel', 'language': 'python'}))
  specs = kernelspec.KernelSpecManager(kernel_dirs=[str(spec_dir)])
  # Connection file (and, on POSIX, the IPC sockets <dir>/connection-ipc-<n>) in
  # the test's tmp dir: no ports to race for between pytest-xdist workers, nothing
  # in ~/.local. TCP where a socket path would pass the ~104-byte limit.
  connection = spec_dir / 'connection.json'
  ipc = os.name == 'posix' and len(str(connection)) < 90
  return manager.KernelManager(
      kernel_name=KERNEL_NAME, kernel_spec_manager=specs,
      connection_file=str(connection), transport='ipc' if ipc else 'tcp')


def kernel_env(tmp_dir: pathlib.Path) -> dict[str, str]:
  """The test's environment for the kernel: the repository importable, one CPU
  device (as on Colab: not the 8 simulated devices of tests/conftest.py), and XLA's
  backend optimisation off. At the notebooks' small settings every cell is bound by
  XLA compilation, which level 0 roughly halves (measured: attention_variants 43 ->
  24 s of CPU); the timings they print are then of unoptimised code, which at these
  sizes describe nothing anyway (the calibrated simulator is fitted to the same)."""
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 env.get('XLA_FLAGS', '')).split()
  env['XLA_FLAGS'] = ' '.join(flags + ['--xla_backend_optimization_level=0'])
  env['IPYTHONDIR'] = str(tmp_dir / 'ipython')  # no history / profile in ~
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  return env


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def execute(nb: nbformat.NotebookNode, tmp_dir: pathlib.Path
           ) -> tuple[nbformat.NotebookNode, float, float]:
  """Runs `nb` in a fresh kernel (cwd: the repository root); returns (executed
  notebook, wall seconds, kernel CPU seconds). Raises CellExecutionError if a cell
  raises."""
  km = kernel_manager(tmp_dir / 'kernels')
  client = nbclient.NotebookClient(
      nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={'metadata': {'path': str(ROOT)}})
  cpu0, start = _children_cpu_s(), time.perf_counter()
  try:
    client.execute(env=kernel_env(tmp_dir))
  finally:
    if client.kc is not None:
      client.kc.stop_channels()
    if km.has_kernel:
      km.shutdown_kernel(now=False)  # waits for the kernel process (reaped)
  return nb, time.perf_counter() - start, _children_cpu_s() - cpu0


def cell_seconds(nb: nbformat.NotebookNode) -> list[tuple[int, float]]:
  """(cell index, seconds) of each executed code cell (nbclient's timing record)."""
  out = []
  for i, cell in enumerate(nb.cells):
    timing = cell.get('metadata', {}).get('execution', {})
    if cell.cell_type == 'code' and 'shell.execute_reply' in timing:
      begin = datetime.datetime.fromisoformat(timing['iopub.execute_input'])
      end = datetime.datetime.fromisoformat(timing['shell.execute_reply'])
      out.append((i, (end - begin).total_seconds()))
  return out


# ----------------------------------------------------------------------------------
# The repository's copies: stripped, Colab badge, install cell, parameters.
# ----------------------------------------------------------------------------------


def test_the_notebooks_are_there():
  assert {'icl_regression.ipynb', 'masks_gallery.ipynb',
          'attention_variants.ipynb', 'dynamic_sparsity.ipynb',
          'recalibration.ipynb'} <= set(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stripped(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'{name} cell {i} has outputs'
      assert cell.execution_count is None, f'{name} cell {i} has an execution count'
    assert 'attachments' not in cell or not cell.attachments, (name, i)
    assert 'execution' not in cell.metadata, f'{name} cell {i} has timings'
    assert not cell.metadata.get('collapsed') and not cell.metadata.get(
        'scrolled'), f'{name} cell {i} has view state'
  assert 'widgets' not in nb.metadata, name


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_opens_with_colab_badge_and_install_cell(name):
  nb = _read(name)
  first = nb.cells[0]
  assert first.cell_type == 'markdown'
  url = (f'https://colab.research.google.com/github/{ORG}/attnlab/blob/main/'
         f'notebooks/{name}')
  assert f'({url})' in first.source and 'colab-badge.svg' in first.source
  code = [c for c in nb.cells if c.cell_type == 'code']
  install = code[0].source
  assert "if 'google.colab' in sys.modules:" in install
  assert f'git+https://github.com/{ORG}/attnlab.git' in install
  # The repository and nothing else: one pip install, of one requirement.
  assert install.count('pip') == 1
  assert re.search(r"'install', '-q',\s*'git\+https://github\.com/"
                   rf"{ORG}/attnlab\.git'\]\)", install), install
  for cell in code[1:]:
    assert 'pip install' not in cell.source and "'install'" not in cell.source


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_has_a_parameters_cell_with_quick_and_workdir(name):
  nb = _read(name)
  source = nb.cells[parameter_cell_index(nb)].source
  assert re.search(r'^QUICK = False\b', source, re.M), source
  assert re.search(r'^WORKDIR = ', source, re.M), source


def test_inject_parameters_lands_right_after_the_parameters_cell():
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('a = 1'),
      nbformat.v4.new_code_cell('QUICK = False', metadata={'tags': ['parameters']}),
      nbformat.v4.new_code_cell('b = QUICK')])
  out = inject_parameters(nb, {'QUICK': True, 'WORKDIR': '/tmp/x'})
  assert [c.source for c in out.cells] == [
      'a = 1', 'QUICK = False',
      "# Parameters injected by tests/notebooks/test_notebooks.py\n"
      "QUICK = True\nWORKDIR = '/tmp/x'", 'b = QUICK']
  assert out.cells[2].metadata.tags == ['injected-parameters']
  assert len(nb.cells) == 3  # the input is not modified
  with pytest.raises(ValueError, match='exactly one code cell tagged'):
    inject_parameters(nbformat.v4.new_notebook(), {})


def test_a_failing_cell_fails_the_execution(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('import sys\nprint(sys.executable)'),
      nbformat.v4.new_code_cell("raise ValueError('boom')"),
      nbformat.v4.new_code_cell("print('not reached')")])
  with pytest.raises(nbclient_exceptions.CellExecutionError, match='boom'):
    execute(nb, tmp_path)
  # The kernel is this interpreter.
  assert nb.cells[0].outputs[0]['text'].strip() == sys.executable
  assert nb.cells[2].outputs == []


# ----------------------------------------------------------------------------------
# Execution with the small settings.
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_executes_with_its_small_settings(name, tmp_path):
  workdir = tmp_path / 'workdir'
  nb = inject_parameters(_read(name), {'QUICK': True, 'WORKDIR': str(workdir)})
  executed, wall_s, cpu_s = execute(nb, tmp_path)
  out = tmp_path / name
  nbformat.write(executed, out)
  slowest = sorted(cell_seconds(executed), key=lambda c: -c[1])[:3]
  print(f'{name}: {wall_s:.1f} s wall, {cpu_s:.1f} s kernel CPU; slowest cells '
        + ', '.join(f'#{i} {s:.1f} s' for i, s in slowest) + f' -> {out}')
  code = [c for c in executed.cells if c.cell_type == 'code']
  assert all(c.execution_count is not None for c in code), name
  assert not any(o.get('output_type') == 'error' for c in code for o in c.outputs)
  assert workdir.is_dir() and any(workdir.iterdir()), 'nothing written to WORKDIR'
  # The repository's copy stays stripped.
  assert all(c.outputs == [] for c in _read(name).cells if c.cell_type == 'code')
