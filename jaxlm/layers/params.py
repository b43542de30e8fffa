"""Parameter creation with logical axis names (the only way layers make params)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str):
  return jnp.dtype(name)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, std: float | None = None,
          init: str = "normal", dtype="float32") -> nnx.Param:
  """A parameter of `shape` whose dims are named by `axes` (see jaxlm.sharding.RULES).

  init: "normal" (truncated normal with `std`), "ones", "zeros".
  """
  if len(shape) != len(axes):
    raise ValueError(f"param shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  dt = jnp.dtype(dtype)
  if init == "normal":
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    value = value.astype(dt)
  elif init == "ones":
    value = jnp.ones(shape, dt)
  elif init == "zeros":
    value = jnp.zeros(shape, dt)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value, logical_axes=tuple(axes))


def logical_axes(var: nnx.Variable) -> tuple[str, ...]:
  return tuple(var.get_metadata().get("logical_axes", (None,) * jnp.ndim(var.value)))
