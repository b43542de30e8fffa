"""SIGTERM / SIGINT handling: finish the step in flight, checkpoint, exit with EXIT_PREEMPTED.

A second signal exits at once. Installed only around the training loop, and only in the
main thread (signal handlers cannot be set elsewhere).

Multi-process runs must stop at the same step on every host (the checkpoint is collective),
so there the decision comes from jax's preemption sync point: jax.distributed's coordination
service turns a SIGTERM (or a TPU maintenance-event notice) reaching any host into the same
`reached_preemption_sync_point(step)` answer on all hosts. Our own handler then covers only
SIGINT, and only the hosts it reaches stop at once on a second one.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

# Distinct status so launchers can tell "preempted, resume me" from success (0) and errors (1).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL


class Preempted(SystemExit):
  def __init__(self, step: int):
    super().__init__(EXIT_PREEMPTED)
    self.step = step


def _sync_point_fn():
  """jax's multi-host preemption sync point, where this jax and a multi-process run have one."""
  import jax
  if jax.process_count() <= 1:
    return None
  try:
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point
  except (ImportError, AttributeError):
    return None


class PreemptionWatcher:
  def __init__(self):
    self.signal_name: str | None = None
    self._sync_point = _sync_point_fn()

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def should_stop(self, step: int) -> bool:
    """True when this step is where the run stops for a signal (the same step on all hosts)."""
    if self._sync_point is not None:
      try:
        if self._sync_point(step):
          self.signal_name = self.signal_name or "preemption notice"
          return True
      except RuntimeError:  # no preemption manager (distributed initialised without it)
        self._sync_point = None
      return False if self._sync_point is not None else self.requested
    return self.requested

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # second signal: no more waiting
      sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now without a checkpoint\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signal_name = signal.Signals(signum).name
    sys.stderr.write(f"\n{self.signal_name}: finishing the current step, then checkpointing\n")
    sys.stderr.flush()

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    # Multi-host: SIGTERM belongs to jax's preemption notifier (see the module docstring).
    sigs = (signal.SIGINT,) if self._sync_point is not None else (signal.SIGTERM, signal.SIGINT)
    old = {s: signal.signal(s, self._handle) for s in sigs}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)
