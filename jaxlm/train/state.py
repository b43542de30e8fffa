"""TrainState and its sharded initialisation."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.models.functional import FunctionalModel


class TrainState(NamedTuple):
  step: jax.Array          # int32 scalar
  params: Any              # pure dict of float32 master params
  opt_state: Any
  rng: jax.Array           # uint32 key data, for stochastic layers


def _opt_axes(tx, params_axes, params_shapes):
  """Logical axes of the optimizer state: moments mirror params; scalars replicate."""
  abstract_opt = jax.eval_shape(tx.init, params_shapes)
  # Optimizer moments have the params' tree structure as a subtree; match by tree structure.
  params_def = jax.tree.structure(params_shapes)
  axes_leaves = jax.tree.leaves(params_axes, is_leaf=lambda x: type(x) is tuple)

  def assign(node):
    if jax.tree.structure(node) == params_def:
      return jax.tree.unflatten(params_def, axes_leaves)
    return None

  def walk(node):
    got = assign(node) if not isinstance(node, jax.ShapeDtypeStruct) else None
    if got is not None:
      return got
    if isinstance(node, jax.ShapeDtypeStruct):
      return (None,) * node.ndim
    children, treedef = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    return jax.tree.unflatten(treedef, [walk(c) for c in children])

  return abstract_opt, walk(abstract_opt)


def state_layout(fm: FunctionalModel, tx: optax.GradientTransformation, mesh):
  """(abstract TrainState, TrainState of NamedShardings) for `fm` on `mesh`."""
  params_shapes = fm.param_shapes
  params_axes = fm.logical_axes
  abstract_opt, opt_axes = _opt_axes(tx, params_axes, params_shapes)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params_shapes, opt_state=abstract_opt,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  rep = sharding.replicated(mesh)
  shardings = TrainState(
      step=rep,
      params=sharding.tree_shardings(params_axes, params_shapes, mesh),
      opt_state=sharding.tree_shardings(opt_axes, abstract_opt, mesh),
      rng=rep)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_state(fm: FunctionalModel, tx, seed: int, mesh) -> TrainState:
  """Initialise directly into the sharded layout (no full copy on one device)."""
  _, shardings = state_layout(fm, tx, mesh)

  def init(seed):
    key = jax.random.key(seed)
    pkey, rkey = jax.random.split(key)
    params = fm.init(pkey)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      jax.random.key_data(rkey))

  with sharding.use_mesh(mesh):
    return jax.jit(init, out_shardings=shardings, static_argnums=0)(seed)
