"""One LIF step in float32, shared by every kernel (Triton, Mosaic GPU, TPU) so that spikes and
clip masks are bit-identical between a forward and the backward's recomputation."""
from __future__ import annotations

import jax.numpy as jnp

from ops.lif import reference


def step_forward(v, x, p):
  """One LIF step in f32: returns (pre-clip u, new v, spike as bool)."""
  u = p["beta"] * v + x
  w = jnp.minimum(jnp.maximum(u, p["v_min"]), p["v_max"])
  s = (w - p["threshold"]) >= 0
  v = jnp.where(s, 0.0, w) if p["reset"] == "hard" else w - jnp.where(s, p["threshold"], 0.0)
  return u, v, s


def step_backward(u, ds, dv, p):
  """Gradient of one step: given u_t, dL/ds_t and dL/dv_t (post-reset), returns dL/du_t."""
  w = jnp.minimum(jnp.maximum(u, p["v_min"]), p["v_max"])
  z = w - p["threshold"]
  s = z >= 0
  if p["reset"] == "hard":
    dw = jnp.where(s, 0.0, dv)
    ds_tot = ds if p["detach_reset"] else ds - w * dv
  else:
    dw = dv
    ds_tot = ds if p["detach_reset"] else ds - p["threshold"] * dv
  dw = dw + ds_tot * reference.surrogate_grad(z, p["surrogate"], p["alpha"])
  inside = (u > p["v_min"]) & (u < p["v_max"])
  return jnp.where(inside, dw, 0.0)


def step_coefficients(u, p):
  """(A, G) with dL/du_t = A * dL/dv_t + G * dL/ds_t for one step, given pre-clip u_t (f32)."""
  w = jnp.minimum(jnp.maximum(u, p["v_min"]), p["v_max"])
  z = w - p["threshold"]
  g = reference.surrogate_grad(z, p["surrogate"], p["alpha"])
  if p["reset"] == "hard":
    keep = jnp.where(z >= 0, 0.0, 1.0)
    a = keep if p["detach_reset"] else keep - w * g
  else:
    a = jnp.ones_like(u) if p["detach_reset"] else 1.0 - p["threshold"] * g
  inside = (u > p["v_min"]) & (u < p["v_max"])
  return jnp.where(inside, a, 0.0), jnp.where(inside, g, 0.0)
