"""The custom_vjp every LIF kernel pair shares (Triton, Mosaic GPU, TPU)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def with_vjp(forward, backward):
  """lif(x, v0, params, interpret, config) -> (spikes, v_last), differentiable.

  forward(x, v0, p, save_ckpt, interpret, config) -> (spikes, v_last) and, with save_ckpt,
  the f32 membrane checkpoints as a third output; backward(x, ckpt, ds, gv, p, interpret,
  config) -> (dx, dv0) recomputes from those checkpoints. params: sorted (name, value) pairs
  (hashable, as a nondiff argument must be); p is their dict.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
  def lif(x, v0, params, interpret, config):
    s, v_last = forward(x, v0, dict(params), False, interpret, config)
    return s, v_last

  def lif_fwd(x, v0, params, interpret, config):
    s, v_last, ckpt = forward(x, v0, dict(params), True, interpret, config)
    return (s, v_last), (x, ckpt)

  def lif_bwd(params, interpret, config, res, cts):
    x, ckpt = res
    ds, gv = cts
    return backward(x, ckpt, ds.astype(x.dtype), gv.astype(jnp.float32), dict(params),
                    interpret, config)

  lif.defvjp(lif_fwd, lif_bwd)
  return lif
