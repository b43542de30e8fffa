"""Reference linear scan in plain jnp (f32 accumulation); the ground truth of ops.scan.

h_t = a_t * h_{t-1} + b_t, h_{-1} = h0 (reverse=True: h_t = a_t * h_{t+1} + b_t from the last
step to the first, h_T = h0).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _prepare(a, b, h0):
  bf = b.astype(jnp.float32)
  af = jnp.broadcast_to(a.astype(jnp.float32), bf.shape)
  if h0 is None:
    h0 = jnp.zeros((b.shape[0], b.shape[2]), jnp.float32)
  return af, bf, h0.astype(jnp.float32)


def linear_scan(a, b, h0=None, *, reverse: bool = False):
  """Associative-scan reference (what implementation="xla" runs). Differentiable by autodiff.

  a: [batch, time, channels] or [channels]; b: [batch, time, channels]; h0: [batch, channels].
  Returns (h [batch, time, channels] in b.dtype, h_last [batch, channels] float32).
  """
  af, bf, h0 = _prepare(a, b, h0)
  first = -1 if reverse else 0
  # Fold h0 into the first step's input: b'_first = b_first + a_first * h0.
  bf = bf.at[:, first].add(af[:, first] * h0)

  def combine(x, y):  # x earlier, y later in scan order
    ax, bx = x
    ay, by = y
    return ax * ay, ay * bx + by

  _, h = lax.associative_scan(combine, (af, bf), reverse=reverse, axis=1)
  h_last = h[:, 0] if reverse else h[:, -1]
  return h.astype(b.dtype), h_last


def linear_scan_sequential(a, b, h0=None, *, reverse: bool = False):
  """Same recurrence with lax.scan, one step at a time (a baseline and a cross-check)."""
  af, bf, h0 = _prepare(a, b, h0)

  def step(h, ab):
    at, bt = ab
    h = at * h + bt
    return h, h

  h_last, h = lax.scan(step, h0, (jnp.swapaxes(af, 0, 1), jnp.swapaxes(bf, 0, 1)),
                       reverse=reverse)
  return jnp.swapaxes(h, 0, 1).astype(b.dtype), h_last
