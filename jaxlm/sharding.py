"""Device mesh and the one logical-axis → mesh-axis rule table.

Params, optimizer state, batches and activations name their dims with logical
axes ("batch", "embed", "heads", …); RULES maps each to mesh axes. A dim whose
size the mapped mesh axes do not divide is replicated instead (e.g. 4 kv heads
on an 8-way tensor axis), so one rule table serves every mesh.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import MeshConfig, validate_for_devices

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis → mesh axes (a tuple shards one dim over several mesh axes).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "seq": (),
    "head_dim": (),
    "layers": (),
}


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_cfg.resolve(len(devices))
  arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_for(cfg, devices=None) -> Mesh:
  """Mesh of a full Config after the device-dependent checks (batch divisibility…)."""
  devices = list(devices if devices is not None else jax.devices())
  validate_for_devices(cfg, len(devices))
  return make_mesh(cfg.mesh, devices)


def spec_for(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> P:
  """PartitionSpec of one array from its logical axes (no mesh axis used twice)."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    mesh_axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
    if mesh_axes and shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
      mesh_axes = ()  # not divisible: replicate this dim
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*out)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh):
  """NamedShardings for a pytree given a matching pytree of logical-axis tuples."""
  is_axes = lambda x: type(x) is tuple and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda ax, s: NamedSharding(mesh, spec_for(ax, s.shape, mesh)),
                      axes_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _current_mesh():
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get else None
  return None if mesh is None or not mesh.shape else mesh


def constrain(x, axes: Sequence[str | None]):
  """Sharding constraint on an activation by logical axes; a no-op outside a mesh context."""
  mesh = _current_mesh()
  if mesh is None or all(v == 1 for v in mesh.shape.values()):
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Make `mesh` the ambient mesh (jax.set_mesh on new jax, sharding.use_mesh on older)."""
  setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  with setter(mesh):
    yield mesh


