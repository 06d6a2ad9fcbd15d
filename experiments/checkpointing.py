"""Orbax checkpoints of the train state plus the data iterator position.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: 'state' (step, params,
optimizer state and RNG key, restored with the same shardings) and 'data' (the
iterator's JSON state). Saves are asynchronous; orbax writes into a temporary
directory and renames it only when every item is complete, and only finalized step
directories are listed, so a run killed in the middle of a save resumes from the
previous complete checkpoint.

A complete checkpoint can still be unusable (a data file truncated by a full disk, a
manifest or the `state/` item deleted, metadata cut short). `restore_newest_usable`
tries the checkpoints newest first and verifies each restore (it must succeed, carry
its own step number and hold only finite floats); an unusable one is reported in one
line and moved aside to `<workdir>/checkpoints_corrupt/<step>` (never deleted) before
falling back to the next. When none is usable, nothing is moved and one
`CheckpointError` lists every step and its cause.
"""

from __future__ import annotations

import gc
import logging as std_logging
import os
import shutil
import sys
from typing import Any, Callable
import warnings

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir could be restored (the message lists why)."""


def _one_line(error: BaseException, limit: int = 200) -> str:
  """'TypeName: first line of the message' cut to `limit` characters."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ''
  if len(text) > limit:
    text = text[:limit - 3] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def verify_restored(step: int, state: Any) -> None:
  """Raises ValueError unless `state` is plausibly the checkpoint of `step`.

  Checks the stored step counter (a state dict with a 'step' entry) and that every
  floating-point leaf is finite: training stops before saving a non-finite step
  (`NonFiniteError`), so NaN/Inf in a checkpoint means damaged data.
  """
  if isinstance(state, dict) and 'step' in state:
    stored = int(np.asarray(jax.device_get(state['step'])))
    if stored != step:
      raise ValueError(f'the state holds step {stored}, not {step}')
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = leaf.addressable_shards[0].data
    arr = np.asarray(jax.device_get(leaf))
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      raise ValueError(
          f'non-finite values in {jax.tree_util.keystr(path)}')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def restore_newest_usable(
    directory: str, steps: list[int], restore: Callable[[int], Any], *,
    corrupt_dir: str, reload: Callable[[], None] | None = None
) -> tuple[int, Any] | None:
  """(step, restored) of the newest checkpoint that restores and verifies.

  Args:
    directory: the checkpoint directory (`<directory>/<step>/`).
    steps: its finalized steps.
    restore: step -> restored object; raises on failure and should call
      `verify_restored`.
    corrupt_dir: where unusable checkpoints are moved when an older one is usable.
    reload: refreshes the checkpoint manager's step list after a move.

  Returns:
    None when there are no checkpoints.

  Raises:
    CheckpointError: there are checkpoints but none is usable (nothing is moved).
  """
  steps = sorted(steps, reverse=True)
  if not steps:
    return None
  failures: list[tuple[int, str]] = []
  for step in steps:
    try:
      with _quiet_async_errors():
        restored = restore(step)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure of any layer (orbax, tensorstore, json, our checks) makes the
      # checkpoint unusable; the cause is reported below in one line.
      failures.append((step, _one_line(e)))
      continue
    _sync('attnlab_checkpoint_fallback')
    for bad, reason in failures:
      target = _move_aside(directory, bad, corrupt_dir)
      logging.warning(
          'checkpoint step %d in %s is unusable (%s); moved it to %s; falling '
          'back to step %d.', bad, directory, reason, target, step)
    _sync('attnlab_checkpoint_fallback_done')
    if failures and reload is not None:
      reload()
    return step, restored
  raise CheckpointError(
      f'no usable checkpoint in {directory}: ' +
      '; '.join(f'step {s}: {r}' for s, r in failures) +
      f'. Nothing was moved or deleted; move {directory} aside to start from '
      f'scratch, or repair it.')


def _move_aside(directory: str, step: int, corrupt_dir: str) -> str:
  """Moves `<directory>/<step>` into `corrupt_dir` (primary process only)."""
  target = os.path.join(corrupt_dir, str(step))
  if os.path.exists(target):  # An earlier copy of the same step: keep both.
    n = 1
    while os.path.exists(f'{target}.{n}'):
      n += 1
    target = f'{target}.{n}'
  if jax.process_index() == 0:
    os.makedirs(corrupt_dir, exist_ok=True)
    shutil.move(os.path.join(directory, str(step)), target)
  return target


class _quiet_async_errors:  # pylint: disable=invalid-name
  """Silences the asyncio noise a failed orbax restore leaves behind.

  A tensorstore read that fails cancels its sibling reads; their tasks and futures
  are reported by asyncio when they are garbage-collected ('Task / Future exception
  was never retrieved', one multi-kilobyte message each), which can be long after the
  restore returned, and callbacks arriving after orbax closed its event loop raise
  'Event loop is closed' in unraisable-exception hooks. On a failed restore this
  collects the garbage while asyncio is still muted, and a lasting filter
  (`install_quiet_event_loop_hook`) drops the reports that are collected later. The
  real cause is the exception of the restore itself, which the caller reports.
  """

  def __enter__(self):
    self._logger = std_logging.getLogger('asyncio')
    self._level = self._logger.level
    self._logger.setLevel(std_logging.CRITICAL)
    install_quiet_event_loop_hook()
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None:
      # Reports the failed reads' orphaned tasks and coroutines now, muted.
      with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                                category=RuntimeWarning)
        gc.collect()
    self._logger.setLevel(self._level)
    return False


_NEVER_RETRIEVED = ('Task exception was never retrieved',
                    'Future exception was never retrieved')
_hook_installed = False


def _is_failed_read_report(record: std_logging.LogRecord) -> bool:
  """Whether `record` is asyncio's report of an orphaned failed tensorstore read."""
  if not (isinstance(record.msg, str) and
          record.msg.startswith(_NEVER_RETRIEVED) and record.exc_info):
    return False
  exc = record.exc_info[1]
  if exc is None:
    return False
  if 'tensorstore' in str(exc):  # tensorstore's errors carry their spec.
    return True
  tb = exc.__traceback__
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if f'{os.sep}orbax{os.sep}' in name or f'{os.sep}tensorstore{os.sep}' in name:
      return True
    tb = tb.tb_next
  return False


def install_quiet_event_loop_hook() -> None:
  """Mutes the leftovers of failed tensorstore reads for the rest of the process.

  Drops 'Event loop is closed' RuntimeErrors from sys.unraisablehook (raised by late
  tensorstore callbacks into orbax's closed per-call event loops after a failed
  read) and asyncio's 'exception was never retrieved' reports whose exception came
  from tensorstore or orbax. Everything else reaches the previous hook / handlers.
  """
  global _hook_installed
  if _hook_installed:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(
      lambda record: not _is_failed_read_report(record))
  _hook_installed = True


class Checkpointer:
  """Save every `every` steps, keep the `keep` most recent, restore the latest."""

  def __init__(self, workdir: str, *, every: int, keep: int,
               async_save: bool = True):
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, CORRUPT_DIR))
    if every < 1:
      raise ValueError(f'checkpoint_every must be >= 1, got {every}.')
    if keep < 1:
      raise ValueError(f'keep_checkpoints must be >= 1, got {keep}.')
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self._every == 0

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an (asynchronous) save of `state` and `data_state` at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state, data_state) of `step`; `abstract_state` gives shapes and shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data_state) of the newest usable checkpoint; None if none.

    Unusable newer checkpoints are reported and moved to `corrupt_directory`; see
    `restore_newest_usable` (raises `CheckpointError` when none is usable).
    """
    def restore(step):
      state, data_state = self.restore(step, abstract_state)
      verify_restored(step, state)
      if not isinstance(data_state, dict):
        raise ValueError(f'the data state is {type(data_state).__name__}, not a '
                         f'dict')
      return state, data_state

    found = restore_newest_usable(self.directory, self.all_steps(), restore,
                                  corrupt_dir=self.corrupt_directory,
                                  reload=self._manager.reload)
    if found is None:
      return None
    step, (state, data_state) = found
    return step, state, data_state

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)
