"""Public LIF API: `lif` (leaky integrate-and-fire over time with a surrogate gradient).

Implementations register below inside ``try/except ImportError``; see ops/_backend.py for the
dispatch rules (None = platform default order ending in "xla", a name, or a sequence).
"""
from __future__ import annotations

import jax.numpy as jnp

from ops import _backend
from ops._backend import CPU, GPU, TPU
from ops.lif import reference

_LIF = _backend.Op("lif", {
    GPU: ("pallas_triton", "xla"),
    TPU: ("pallas_tpu", "xla"),
    CPU: ("xla",),
})


def _xla(x, v0, *, params, interpret, config):
  del interpret, config
  p = dict(params)
  return reference.lif(x, v0, beta=p["beta"], threshold=p["threshold"], v_min=p["v_min"],
                       v_max=p["v_max"], reset=p["reset"], surrogate=p["surrogate"],
                       surrogate_alpha=p["alpha"], detach_reset=p["detach_reset"])


_LIF.register("xla", _xla)

try:
  from ops.lif import pallas_triton as _pallas_triton
  _LIF.register("pallas_triton", _pallas_triton.lif, platforms=(GPU,))
except ImportError:
  pass
try:
  # not in the GPU default list: compiled on no GPU yet (written in session 9 after the
  # device time was spent)
  from ops.lif import pallas_mosaic_gpu as _pallas_mosaic_gpu
  _LIF.register("pallas_mosaic_gpu", _pallas_mosaic_gpu.lif, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.lif import pallas_tpu as _pallas_tpu
  _LIF.register("pallas_tpu", _pallas_tpu.lif, platforms=(TPU,))
except ImportError:
  pass


def implementations() -> tuple[str, ...]:
  """Names registered for `lif`."""
  return _LIF.names


def lif(x, v0=None, *, beta: float = 0.95, threshold: float = 1.0, v_min: float = -3.0,
        v_max: float = 3.0, reset: str = "hard", surrogate: str = "atan",
        surrogate_alpha: float = 2.0, detach_reset: bool = True, implementation=None,
        interpret: bool | None = None, config=None):
  """Leaky integrate-and-fire over time, per channel (computed in float32).

  x: [batch, time, channels]; v0: [batch, channels] or None (zeros). For each t:
    u = beta * v + x_t;  w = clamp(u, v_min, v_max);  s_t = 1[w >= threshold];
    reset "hard": v = w * (1 - s_t);  "subtract": v = w - threshold * s_t.
  Returns (spikes [batch, time, channels] in x.dtype, values exactly 0/1; v_last [batch,
  channels] float32) — chaining calls through v_last equals one call.

  Backward: BPTT through the leak and the clamp (zero gradient where u is clamped, i.e. unless
  v_min < u < v_max), with dH/dz replaced by a surrogate g(z), z = w - threshold, a =
  surrogate_alpha: "atan" g = 1/(1 + (a z)^2) (SymbolicLight, a = 2); "sigmoid" g =
  a sig(a z)(1 - sig(a z)); "triangle" g = max(0, 1 - a |z|). detach_reset=True treats s_t in
  the reset as a constant; False differentiates through it. Gradients to x and v0.
  `implementation`: None (platform default order), a name or a sequence; `config`: a LifConfig.
  """
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, time, channels]; got shape {x.shape}")
  B, T, C = x.shape
  if T < 1:
    raise ValueError("time length must be >= 1")
  if reset not in reference.RESETS:
    raise ValueError(f"unknown reset {reset!r}; choose from {reference.RESETS}")
  if surrogate not in reference.SURROGATES:
    raise ValueError(f"unknown surrogate {surrogate!r}; choose from {reference.SURROGATES}")
  if not v_min < v_max:
    raise ValueError(f"need v_min < v_max; got {v_min}, {v_max}")
  if v0 is None:
    v0 = jnp.zeros((B, C), jnp.float32)
  elif v0.shape != (B, C):
    raise ValueError(f"v0 must be [batch, channels] = {(B, C)}; got {v0.shape}")
  v0 = v0.astype(jnp.float32)
  params = tuple(sorted(dict(beta=float(beta), threshold=float(threshold), v_min=float(v_min),
                             v_max=float(v_max), reset=str(reset), surrogate=str(surrogate),
                             alpha=float(surrogate_alpha),
                             detach_reset=bool(detach_reset)).items()))
  return _LIF(implementation, x, v0, params=params, interpret=interpret, config=config)
