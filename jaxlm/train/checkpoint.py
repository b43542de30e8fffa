"""Orbax checkpoints of TrainState + data-iterator position + config.

Saves are asynchronous (the step loop keeps going while arrays are written)
and keep the newest `keep` steps. A state with a non-finite parameter is never
written. Restoring reshards onto whatever mesh the abstract target names.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class NonFiniteStateError(RuntimeError):
  """Refused to save a state with NaN/inf parameters."""


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config"))

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    if not bool(_all_finite(state.params)):
      raise NonFiniteStateError(f"step {step}: parameters are not finite; checkpoint not written")
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def restore(self, step: int, abstract_state):
    """Restore (state, data_state, config dict) of `step` onto abstract_state's shardings."""
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return out.state, out.data, out.config

  def restore_config(self, step: int) -> dict:
    return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
