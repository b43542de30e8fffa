"""SIGTERM / SIGINT handling: finish the step in flight, checkpoint, exit with EXIT_PREEMPTED.

A second signal exits at once. Installed only around the training loop, and only in the
main thread (signal handlers cannot be set elsewhere).
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


class PreemptionWatcher:
  def __init__(self):
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

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
    old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)
