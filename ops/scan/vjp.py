"""The custom_vjp every linear-scan kernel pair shares (Triton, Mosaic GPU, TPU)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def with_vjp(forward, backward):
  """scan(a, b, h0, reverse, interpret, config) -> (h, h_last), differentiable.

  forward(a, b, h0, reverse, interpret, config) -> (h [B, T, C], h_last [B, C] f32);
  backward(a, h, h0, g, g_last, reverse, interpret, config) -> (da, db, dh0), reading the
  forward's h instead of storing anything else (residuals: a, h, h0).
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def scan(a, b, h0, reverse, interpret, config):
    return forward(a, b, h0, reverse, interpret, config)

  def scan_fwd(a, b, h0, reverse, interpret, config):
    h, h_last = forward(a, b, h0, reverse, interpret, config)
    return (h, h_last), (a, h, h0)

  def scan_bwd(reverse, interpret, config, res, cts):
    a, h, h0 = res
    g, g_last = cts
    da, db, dh0 = backward(a, h, h0, g.astype(h.dtype), g_last.astype(jnp.float32), reverse,
                           interpret, config)
    return da, db.astype(h.dtype), dh0

  scan.defvjp(scan_fwd, scan_bwd)
  return scan
