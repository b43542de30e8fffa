"""Spiking building blocks of SymbolicLight (jaxlm/models/symboliclight.py).

- `LayerNorm` (scale and bias, statistics in float32): the paper's blocks use LayerNorm.
- `heaviside(z)`: stateless spike H(z) = 1[z >= 0] whose derivative is the surrogate g(z) of
  ops.lif (the same custom_jvp ops.lif's reference uses, so every spike in the model shares one
  surrogate: atan g = 1 / (1 + (a z)^2) by default).
- `topk_mask`: the top-k ablation of the LIF encoder: per token, 1 on the k channels of largest
  |x| (ties to the lower index), 0 elsewhere; straight-through gradient (ds/dx = 1).
- `const_param`: a parameter filled with one value, with logical axes.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.params import param
from ops.lif.reference import spike as _surrogate_spike


def const_param(value: float, shape: Sequence[int], axes: Sequence[str], dtype="float32"):
  """A parameter of `shape` filled with `value`, named by `axes` (see jaxlm.sharding.RULES)."""
  if len(shape) != len(axes):
    raise ValueError(f"param shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  return nnx.Param(jnp.full(tuple(shape), value, jnp.dtype(dtype)), logical_axes=tuple(axes))


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype="float32"):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("embed",), init="ones", dtype=param_dtype)
    self.bias = param(rngs, (dim,), ("embed",), init="zeros", dtype=param_dtype)

  def __call__(self, x):
    """x: [..., dim] → same shape and dtype; statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)
    return y.astype(x.dtype)


def heaviside(z, surrogate: str = "atan", alpha: float = 2.0):
  """H(z) = 1[z >= 0] in z.dtype; backward dH/dz = ops.lif's surrogate g(z) (computed in f32)."""
  return _surrogate_spike(z.astype(jnp.float32), surrogate, float(alpha)).astype(z.dtype)


def topk_mask(x, k: int):
  """x [..., d] → 0/1 mask of the k largest |x| per row (in x.dtype), straight-through."""
  d = x.shape[-1]
  if not 1 <= k <= d:
    raise ValueError(f"k must be in [1, {d}], got {k}")
  _, idx = jax.lax.top_k(jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32), k)
  hard = jnp.sum(jax.nn.one_hot(idx, d, dtype=x.dtype), axis=-2)
  return hard + (x - jax.lax.stop_gradient(x))
