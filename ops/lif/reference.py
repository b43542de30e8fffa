"""Reference LIF (lax.scan + a custom_jvp Heaviside): the semantics every kernel matches.

Per channel, for t = 0..T-1 (v = v0 before the first step):
  u_t = beta * v + x_t                      (pre-clip potential)
  w_t = clamp(u_t, v_min, v_max)            (gradient passes only where v_min < u_t < v_max)
  s_t = H(w_t - threshold)                  (1 where w_t >= threshold, else 0)
  v   = w_t * (1 - s_t)        reset="hard"
  v   = w_t - threshold * s_t  reset="subtract"
Backward: exact BPTT through the leak, the clamp and the reset, except dH/dz is replaced by the
surrogate g(z) (z = w_t - threshold, a = surrogate_alpha):
  "atan":     g(z) = 1 / (1 + (a z)^2)                          (SymbolicLight: a = 2)
  "sigmoid":  g(z) = a * sig(a z) * (1 - sig(a z)),  sig(y) = 1 / (1 + exp(-y))
  "triangle": g(z) = max(0, 1 - a |z|)
detach_reset=True uses stop_gradient(s_t) inside the reset (no gradient through it).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

SURROGATES = ("atan", "sigmoid", "triangle")
RESETS = ("hard", "subtract")


def surrogate_grad(z, kind: str, alpha: float):
  """The surrogate derivative g(z) of the Heaviside step (plain jnp; also used in kernels)."""
  if kind == "atan":
    az = alpha * z
    return 1.0 / (1.0 + az * az)
  if kind == "sigmoid":
    sg = 1.0 / (1.0 + jnp.exp(-alpha * z))
    return alpha * sg * (1.0 - sg)
  if kind == "triangle":
    return jnp.maximum(0.0, 1.0 - alpha * jnp.abs(z))
  raise ValueError(f"unknown surrogate {kind!r}; choose from {SURROGATES}")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def spike(z, kind: str, alpha: float):
  """Heaviside H(z) = 1[z >= 0] with derivative surrogate_grad(z)."""
  return (z >= 0).astype(z.dtype)


@spike.defjvp
def _spike_jvp(kind, alpha, primals, tangents):
  (z,), (dz,) = primals, tangents
  return spike(z, kind, alpha), surrogate_grad(z, kind, alpha) * dz


def lif(x, v0=None, *, beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard",
        surrogate="atan", surrogate_alpha=2.0, detach_reset=True):
  """x: [batch, time, channels]; v0: [batch, channels] or None (zeros).

  Returns (spikes [batch, time, channels] in x.dtype, v_last [batch, channels] float32).
  Computes in float32.
  """
  if reset not in RESETS:
    raise ValueError(f"unknown reset {reset!r}; choose from {RESETS}")
  if surrogate not in SURROGATES:
    raise ValueError(f"unknown surrogate {surrogate!r}; choose from {SURROGATES}")
  xf = x.astype(jnp.float32)
  if v0 is None:
    v0 = jnp.zeros((x.shape[0], x.shape[2]), jnp.float32)
  v0 = v0.astype(jnp.float32)
  lo, hi = jnp.float32(v_min), jnp.float32(v_max)

  def step(v, xt):
    u = beta * v + xt
    w = lax.clamp(lo, u, hi)
    s = spike(w - threshold, surrogate, surrogate_alpha)
    sr = lax.stop_gradient(s) if detach_reset else s
    v = w * (1.0 - sr) if reset == "hard" else w - threshold * sr
    return v, s

  v_last, s = lax.scan(step, v0, jnp.swapaxes(xf, 0, 1))
  return jnp.swapaxes(s, 0, 1).astype(x.dtype), v_last
