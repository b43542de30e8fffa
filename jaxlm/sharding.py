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
    # the expert axis is data parallelism outside the MoE layers (they move tokens between its
    # devices with all-to-all), so a chip never holds activations replicated over it
    "batch": ("data", "fsdp", "expert"),
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


def current_mesh():
  """The ambient (abstract) mesh set by use_mesh, or None."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get else None
  return None if mesh is None or not mesh.shape else mesh


def multi_device_mesh():
  """The ambient mesh when it spans several devices, else None."""
  mesh = current_mesh()
  return None if mesh is None or all(v == 1 for v in mesh.shape.values()) else mesh


def constrain(x, axes: Sequence[str | None]):
  """Sharding constraint on an activation by logical axes; a no-op outside a mesh context."""
  mesh = multi_device_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


try:
  _shard_map = jax.shard_map
  _NO_CHECK = {"check_vma": False}
except AttributeError:  # older jax
  from jax.experimental.shard_map import shard_map as _shard_map
  _NO_CHECK = {"check_rep": False}


def shard_map(fn, mesh, in_specs, out_specs):
  """jax.shard_map on any supported jax, without the replication check (ops kernels are
  custom calls it cannot see through)."""
  return _shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK)


def per_shard(fn, args: Sequence, in_axes: Sequence, out_axes, out_shapes):
  """fn(*args) run on each device's block when the ambient mesh has several devices.

  ops kernels (Pallas Mosaic TPU / Triton) are custom calls XLA cannot partition: Mosaic
  refuses sharded operands outside shard_map, and anything else would be gathered. Layers
  call them through this with the logical axes of each operand, so each device runs the
  kernel on its local batch / heads block. fn must then be independent across the sharded
  dims (attention over batch and heads, scans over batch and channels).

  args: operands (None entries pass through as None); in_axes: a logical-axes tuple per arg
  (None for replicated); out_axes / out_shapes: matching pytrees of logical-axes tuples and
  global shapes of fn's outputs. Outside a multi-device mesh this is just fn(*args).
  """
  mesh = multi_device_mesh()
  if mesh is None:
    return fn(*args)
  present = [i for i, a in enumerate(args) if a is not None]
  in_specs = tuple(P() if in_axes[i] is None else spec_for(in_axes[i], args[i].shape, mesh)
                   for i in present)
  is_axes = lambda x: type(x) is tuple and all(a is None or isinstance(a, str) for a in x)
  out_specs = jax.tree.map(lambda ax, shape: spec_for(ax, shape, mesh), out_axes, out_shapes,
                           is_leaf=is_axes)

  def local(*xs):
    full = list(args)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  return shard_map(local, mesh, in_specs, out_specs)(*(args[i] for i in present))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Make `mesh` the ambient mesh (jax.set_mesh on new jax, sharding.use_mesh on older)."""
  setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  with setter(mesh):
    yield mesh


