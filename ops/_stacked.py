"""Decode caches stacked over layers: [layers, batch, ...] read at one layer in place.

A model that scans its layers keeps every layer's KV cache in one stacked array. Handing a
kernel `cache[layer]` makes XLA copy that layer's slice into a fresh buffer first (a custom
call's operand must be a whole buffer): at 64k tokens that copy is several times the bytes
the decode kernel itself reads. Decode ops therefore take the stacked cache and the layer
index, and their kernels index the layer inside (Triton: a scalar operand and a dynamic first
index on the cache ref).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_layer(layer, n_layers: int, op: str):
  """layer (a Python int or an integer scalar, traced or not) -> int32 scalar array.

  A static int outside [0, n_layers) is a ValueError; a traced index cannot be range-checked
  and is clamped by the dynamic indexing, as lax.dynamic_index_in_dim does."""
  if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
    if not 0 <= int(layer) < n_layers:
      raise ValueError(f"{op}: layer {int(layer)} outside the stacked cache's {n_layers} layers")
    return jnp.int32(layer)
  shape, dtype = jnp.shape(layer), getattr(layer, "dtype", None)
  if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{op}: layer must be an int or an integer scalar; got "
                     f"{type(layer).__name__} shape {shape} dtype {dtype}")
  return jnp.asarray(layer, jnp.int32)


def layer_slice(cache, layer):
  """cache [layers, ...] -> [...] at `layer` (XLA fuses it into a fusion consumer; a custom
  call consumer gets a copy)."""
  return jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)


def for_kernel(caches, layer, min_rows: int, dims):
  """(caches [layers, batch, rows, heads, dim], layer int32) for a kernel that reads one layer
  in place. caches: [(layers,) batch, len, heads, dim] each (stacked when layer is given);
  dims: the head dim each kernel tile needs. In place (unstacked caches gain a layer axis of 1,
  a free reshape) when every cache has >= min_rows rows and its dim; otherwise only the
  layer's slices are copied, padded to those rows and dims."""
  if all(c.shape[-3] >= min_rows and c.shape[-1] == d for c, d in zip(caches, dims)):
    return (caches, layer) if layer is not None else (tuple(c[None] for c in caches),
                                                      jnp.int32(0))
  if layer is not None:
    caches = tuple(layer_slice(c, layer) for c in caches)
  padded = tuple(jnp.pad(c, ((0, 0), (0, max(0, min_rows - c.shape[1])), (0, 0),
                             (0, d - c.shape[3])))[None] for c, d in zip(caches, dims))
  return padded, jnp.int32(0)
