"""Implementation dispatch shared by every op in this package.

An op owns an :class:`Op` registry. Each implementation module registers itself
at import time (inside ``try/except ImportError`` in the op's ``api.py``), so a
jax build that lacks a backend only loses that implementation.

``implementation`` on a public op function is one of:
  * ``None`` — the op's ordered default list for the current platform; that
    list always ends in ``"xla"``;
  * a name — exactly that implementation;
  * a sequence of names — tried in order.
An implementation that cannot handle the given shapes/options raises
``NotImplementedError`` and the next one is tried; when none succeeds the error
lists every implementation's reason. An unknown name is a ``ValueError``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Sequence

import jax

XLA = "xla"

# Platforms as jax.default_backend() names them.
CPU, GPU, TPU = "cpu", "gpu", "tpu"


class UnsupportedError(NotImplementedError):
  """An implementation cannot handle this call; dispatch moves to the next."""


# (platform, device kind) that ops trace for instead of the local backend; set by `target`.
_TARGET: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "ops_target", default=None)


@contextlib.contextmanager
def target(platform_name: str, device_kind_name: str):
  """Trace ops for another platform than the local backend, e.g. ("tpu", "TPU v5 lite").

  Ahead-of-time compilation for TPU topologies on a CPU host (jaxlm/aot.py): inside this
  context `platform()` and `device_kind()` report the target, so default implementation
  lists, block-size heuristics and `resolve_interpret` (no interpret mode) follow the
  target chip. Only for lowering/compiling: the traced code cannot run on the local backend.
  """
  token = _TARGET.set((platform_name, device_kind_name))
  try:
    yield
  finally:
    _TARGET.reset(token)


def platform() -> str:
  """The platform ops run on: 'cpu', 'gpu' or 'tpu' (ROCm/CUDA are both 'gpu')."""
  tgt = _TARGET.get()
  if tgt is not None:
    return tgt[0]
  backend = jax.default_backend()
  return GPU if backend in ("cuda", "rocm", "gpu") else backend


def device_kind() -> str:
  """Device kind of the first local device, e.g. 'NVIDIA H100 80GB HBM3'."""
  tgt = _TARGET.get()
  if tgt is not None:
    return tgt[1]
  return jax.local_devices()[0].device_kind


def resolve_interpret(interpret: bool | None, needs: str) -> bool:
  """Whether a Pallas kernel that compiles for platform `needs` runs interpreted.

  None means: interpret exactly when the current platform is not `needs`
  (CPU tests). False on the wrong platform cannot work, so it is an
  UnsupportedError, which lets dispatch fall through to the next candidate.
  """
  here = platform()
  if interpret is None:
    return here != needs
  if not interpret and here != needs:
    raise UnsupportedError(f"compiles for {needs}, running on {here} (pass interpret=True)")
  return bool(interpret)


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  fn: Callable
  # Platforms on which the implementation is in the default list's candidates.
  platforms: tuple[str, ...]


class Op:
  """Registry and dispatcher of one op's implementations."""

  def __init__(self, name: str, defaults: dict[str, Sequence[str]]):
    for plat, order in defaults.items():
      if not order or order[-1] != XLA:
        raise ValueError(f"{name}: default order for {plat} must end in {XLA!r}")
    self.name = name
    self._defaults = {k: tuple(v) for k, v in defaults.items()}
    self._impls: dict[str, Implementation] = {}

  def register(self, name: str, fn: Callable, platforms: Sequence[str] = (CPU, GPU, TPU)):
    self._impls[name] = Implementation(name, fn, tuple(platforms))
    return fn

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._impls)

  def candidates(self, implementation: str | Sequence[str] | None) -> tuple[str, ...]:
    if implementation is None:
      order = self._defaults.get(platform(), (XLA,))
      # A default that failed to register (old jax) is silently skipped.
      return tuple(n for n in order if n in self._impls)
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    if not names:
      raise ValueError(f"{self.name}: implementation sequence is empty")
    for n in names:
      if n not in self._impls:
        raise ValueError(
            f"{self.name}: unknown implementation {n!r}; registered: {sorted(self._impls)}")
    return names

  def __call__(self, implementation, *args, **kwargs):
    reasons = []
    for name in self.candidates(implementation):
      try:
        return self._impls[name].fn(*args, **kwargs)
      except NotImplementedError as e:
        reasons.append(f"  {name}: {e}")
    raise NotImplementedError(
        f"{self.name}: no implementation can handle this call:\n" + "\n".join(reasons))
