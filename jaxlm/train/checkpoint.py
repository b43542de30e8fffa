"""Orbax checkpoints of TrainState + data-iterator position + config.

Saves are asynchronous (the step loop keeps going while arrays are written)
and keep the newest `keep` steps. A state with a non-finite parameter is never
written. Restoring reshards onto whatever mesh the abstract target names.

Each save also stores a position-weighted checksum of every state leaf (in the
"data" item, key `_state_checksum`); restore recomputes it, so flipped or
zeroed bytes that orbax itself reads without complaint raise
CorruptCheckpointError. A failed write (disk full, permissions) raises
CheckpointSaveError naming the step; the finished checkpoints stay untouched.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


_CHECKSUM_KEY = "_state_checksum"


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _leaf_checksum(x) -> jax.Array:
  """uint32 sum of the leaf's bits times an odd per-position weight (wraps mod 2**32, so the
  result does not depend on reduction order or sharding); catches changed and swapped values."""
  x = jnp.ravel(x)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif size == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte leaves: two uint32 words each
    bits = jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
  weight = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _checksums(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


class NonFiniteStateError(RuntimeError):
  """Refused to save a state with NaN/inf parameters."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint was read, but its contents are not what was saved."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (e.g. disk full); the finished checkpoints are untouched."""


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config"))
    self._pending: int | None = None  # step of an async save that may still be writing

  def _save_failed(self, step: int, e: Exception) -> CheckpointSaveError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
      self._mgr.reload()
      kept = f"the finished checkpoints are untouched: steps {self.all_steps()}"
    except Exception:  # pylint: disable=broad-except
      kept = "the finished checkpoints were not deleted"
    return CheckpointSaveError(f"writing the checkpoint of step {step} to {self.directory} "
                               f"failed ({type(e).__name__}: {first}); {kept}")

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    if not bool(_all_finite(state.params)):
      raise NonFiniteStateError(f"step {step}: parameters are not finite; checkpoint not written")
    self.wait()  # surfaces a failed earlier async save before starting this one
    data = dict(data_state)
    data[_CHECKSUM_KEY] = [int(c) for c in jax.device_get(_checksums(state))]
    self._pending = step
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave(config)), force=True)
    except Exception as e:
      self._pending = None
      raise self._save_failed(step, e) from e

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def restore(self, step: int, abstract_state):
    """Restore (state, data_state, config dict) of `step` onto abstract_state's shardings."""
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    data = out.data
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
      raise CorruptCheckpointError(f"step {step}: the data-iterator state is malformed: {data!r:.200}")
    data = dict(data)
    stored = data.pop(_CHECKSUM_KEY, None)
    if stored is not None:  # checkpoints written before checksums existed have none
      got = [int(c) for c in jax.device_get(_checksums(out.state))]
      if got != stored:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(out.state)]
        bad = [p for p, a, b in zip(paths, got, stored) if a != b] if len(got) == len(stored) else paths
        raise CorruptCheckpointError(
            f"step {step}: the restored state does not match the checksum written with it "
            f"({len(bad)} of {len(paths)} arrays differ, e.g. {', '.join(bad[:3])})")
    if not bool(_all_finite(out.state.params)):
      raise CorruptCheckpointError(f"step {step}: the restored parameters are not finite")
    return out.state, data, out.config

  def restore_config(self, step: int) -> dict:
    return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def quarantine(self, step: int) -> str | None:
    """Moves a broken step out of the managed directory (nothing is deleted) so that training
    can continue past it and write that step again; returns where it went."""
    src = os.path.join(self.directory, str(step))
    dest = None
    if jax.process_index() == 0 and os.path.isdir(src):
      dest = os.path.join(f"{self.directory}.broken", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"jaxlm_quarantine_{step}")
    self._mgr.reload()
    return dest

  def wait(self) -> None:
    pending, self._pending = self._pending, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:
      raise self._save_failed(pending, e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mgr.close()
