"""Stack identical NNX modules into one whose params have a leading "layers" axis,
and run them with lax.scan (one compiled block regardless of depth)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  graphdef, first = nnx.split(modules[0])
  states = [first] + [nnx.split(m)[1] for m in modules[1:]]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    if axes is not None:
      var.set_metadata("logical_axes", ("layers",) + tuple(axes))
  return nnx.merge(graphdef, stacked)


def maybe_remat(fn: Callable, remat: str) -> Callable:
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


def scan_blocks(stacked: nnx.Module, x, layer_xs, body: Callable, remat: str):
  """Run `body(block, x, layer_x) -> (x, layer_y)` over the stacked blocks.

  layer_xs: pytree with a leading layers axis (or None); returns (x, stacked layer_ys).
  """
  graphdef, state = nnx.split(stacked)

  def step(carry, inputs):
    layer_state, layer_x = inputs
    return body(nnx.merge(graphdef, layer_state), carry, layer_x)

  return jax.lax.scan(maybe_remat(step, remat), x, (state, layer_xs))
