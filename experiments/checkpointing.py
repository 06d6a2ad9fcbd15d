"""Orbax checkpoints of the train state plus the data iterator position.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: 'state' (step, params,
optimizer state and RNG key, restored with the same shardings) and 'data' (the
iterator's JSON state). Saves are asynchronous; orbax writes into a temporary
directory and renames it only when every item is complete, and only finalized step
directories are listed, so a run killed in the middle of a save resumes from the
previous complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


class Checkpointer:
  """Save every `every` steps, keep the `keep` most recent, restore the latest."""

  def __init__(self, workdir: str, *, every: int, keep: int,
               async_save: bool = True):
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
