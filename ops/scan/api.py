"""Public linear-scan API: `linear_scan` (h_t = a_t * h_{t-1} + b_t over time).

Implementations register below inside ``try/except ImportError``; see ops/_backend.py for the
dispatch rules (None = platform default order ending in "xla", a name, or a sequence).
"""
from __future__ import annotations

import jax.numpy as jnp

from ops import _backend
from ops._backend import GPU, TPU, CPU
from ops.scan import reference

_SCAN = _backend.Op("linear_scan", {
    GPU: ("pallas_triton", "xla"),
    TPU: ("pallas_tpu", "xla"),
    CPU: ("xla",),
})


def _xla(a, b, h0, *, reverse, interpret, config):
  del interpret, config
  return reference.linear_scan(a, b, h0, reverse=reverse)


_SCAN.register("xla", _xla)

try:
  from ops.scan import pallas_triton as _pallas_triton
  _SCAN.register("pallas_triton", _pallas_triton.linear_scan, platforms=(GPU,))
except ImportError:
  pass
try:
  # not in the GPU default list: compiled on no GPU yet (written in session 9 after the
  # device time was spent)
  from ops.scan import pallas_mosaic_gpu as _pallas_mosaic_gpu
  _SCAN.register("pallas_mosaic_gpu", _pallas_mosaic_gpu.linear_scan, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.scan import pallas_tpu as _pallas_tpu
  _SCAN.register("pallas_tpu", _pallas_tpu.linear_scan, platforms=(TPU,))
except ImportError:
  pass


def implementations() -> tuple[str, ...]:
  """Names registered for `linear_scan`."""
  return _SCAN.names


def linear_scan(a, b, h0=None, *, reverse: bool = False, implementation=None,
                interpret: bool | None = None, config=None):
  """h_t = a_t * h_{t-1} + b_t over time (reverse=True: h_t = a_t * h_{t+1} + b_t, last to first).

  b: [batch, time, channels]; a: same shape as b, or [channels] (a constant per-channel decay,
  broadcast over batch and time); h0: [batch, channels] or None (zeros) — the state before the
  first step taken. Accumulates in float32.

  Returns (h [batch, time, channels] in b.dtype, h_last [batch, channels] float32), h_last being
  the state after the last step taken (so two calls chained through h_last == one call).
  Differentiable in a (summed over batch/time when a is [channels]), b and h0; the GPU/TPU
  kernels' backward is a reverse-time kernel. `implementation`: None (platform default order),
  a name or a sequence of names; `config`: a ScanConfig (None = per-device default).
  """
  if b.ndim != 3:
    raise ValueError(f"b must be [batch, time, channels]; got shape {b.shape}")
  B, T, C = b.shape
  if a.shape != b.shape and a.shape != (C,):
    raise ValueError(f"a must be {b.shape} or ({C},); got {a.shape}")
  if T < 1:
    raise ValueError("time length must be >= 1")
  if h0 is None:
    h0 = jnp.zeros((B, C), jnp.float32)
  elif h0.shape != (B, C):
    raise ValueError(f"h0 must be [batch, channels] = {(B, C)}; got {h0.shape}")
  h0 = h0.astype(jnp.float32)
  return _SCAN(implementation, a, b, h0, reverse=bool(reverse), interpret=interpret,
               config=config)
