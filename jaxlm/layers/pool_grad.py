"""UniPool's deferred pool gradient (MoEConfig.pool_grad="deferred").

Every layer that shares a pool adds its own d W = x_l^T dout_l to the pool's gradient. Left to
autodiff, each layer's backward computes a whole-pool [M, d, f] tgmm from its few rows per
expert, and the scanned backward adds it to an f32 accumulator of the whole pool: for
unipool_469m (M = 192, d 1024, f 4096) about 29 GB of traffic per layer and step, whatever the
batch. Deferred, each layer only hands over its rows (sorted by expert) and their output
cotangents; after the last layer's backward one tgmm per weight and pool contracts all layers'
rows at once (rows of one expert from every layer are contiguous after one stable sort), in
f32, and writes the pool gradient once.

How the rows reach the end of the backward: `make_taps` gives zero-valued "taps" with a
leading layers axis; each layer gets its slice and threads it through `report_value` (the
tap's cotangent becomes a primal value: the expert inputs, the SwiGLU product, the group sizes)
and `report_cotangent` (the tap's cotangent becomes the output cotangent of a grouped matmul).
The taps' cotangents, stacked by the layer scan, arrive at make_taps' backward, which computes
the pool gradient from them. The layers see the pool through stop_gradient, so autodiff makes
no per-layer pool gradient. Cost: the taps ([layers, rows, 2 d + 3 f] in the compute dtype)
are held as zeros in the forward and as rows in the backward; MoEConfig.pool_grad_chunk defers
over fewer layers at a time (jaxlm/models/stacking.scan_blocks_in_chunks).

On a data / fsdp mesh the rows are split over the devices like the tokens; each device sorts
and contracts its own rows and the pool gradients are summed (psum). Tensor or expert axes are
refused: there the taps' cotangents would be summed over copies.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

import ops.gmm
from jaxlm import sharding

# tap names -> which width (d: model, f: expert) their rows have
TAP_WIDTHS = {"xs": "d", "h": "f", "dg": "f", "du": "f", "dy": "d"}
WEIGHTS = ("w_gate", "w_up", "w_down")


def _part(v, part):
  """v's last-axis block of this device: part = (mesh axis, block width) or None (all of v)."""
  if part is None:
    return v
  axis, width = part
  start = jax.lax.axis_index(axis) * width
  return jax.lax.dynamic_slice_in_dim(v, start, width, axis=v.ndim - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def report_value(x, tap, value, part=None):
  """Returns x; in the backward the tap's cotangent is `value` (same shape as tap), or with
  part = (mesh axis, width) inside shard_map, this device's last-axis block of `value`."""
  del tap, value
  return x


def _report_value_fwd(x, tap, value, part):
  return x, (_part(value, part), jnp.zeros((), tap.dtype))


def _report_value_bwd(part, res, ct):
  value, like = res
  return ct, value.astype(like.dtype), None


report_value.defvjp(_report_value_fwd, _report_value_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def report_cotangent(y, tap, part=None):
  """Returns y; in the backward the tap's cotangent is y's cotangent (with part, as
  report_value, this device's block of it)."""
  del tap
  return y


def _report_cotangent_fwd(y, tap, part):
  return y, jnp.zeros((), tap.dtype)


def _report_cotangent_bwd(part, like, ct):
  return ct, _part(ct, part).astype(like.dtype)


report_cotangent.defvjp(_report_cotangent_fwd, _report_cotangent_bwd)


@jax.custom_vjp
def compute_copy(w, w_cast):
  """w_cast (w already cast to the compute dtype, once, outside the layer scan) carrying w's
  gradient: the cotangent goes to w in w's dtype (so a pool shared by the scanned layers still
  sums its per-layer gradients in f32), none to w_cast. Through it a layer reads a shared pool
  without converting the whole pool itself, in the forward and again in the remat backward."""
  del w
  return w_cast


def _compute_copy_fwd(w, w_cast):
  return w_cast, jnp.zeros((), w.dtype)


def _compute_copy_bwd(like, ct):
  return ct.astype(like.dtype), None


compute_copy.defvjp(_compute_copy_fwd, _compute_copy_bwd)


class TapSpec(NamedTuple):
  """Static description of the taps of `make_taps` (hashable).

  layer_pool: the pool of each layer; rows: assignment rows of one layer (tokens x top_k, all
  devices); dtype: the compute dtype; implementation: ops.gmm's for the tgmm; tok_axes: the mesh
  axes the rows are split over on a data-parallel mesh (() on one device), shards: the number
  of devices reporting group sizes (each its own slot); embed_axis: the mesh axis that splits
  the experts over d when the layers run split (expert_pool.fsdp_split_embed), else None: then
  every tap's width is split over it too (d for xs / dy; f for h / dg / du, each device
  reporting its block of the rows it shares with the axis), and shards counts its devices."""
  layer_pool: tuple
  rows: int
  dtype: Any
  implementation: Any = None
  tok_axes: tuple = ()
  shards: int = 1
  embed_axis: Any = None


def tap_shapes(spec: TapSpec, d: int, f: int, n_experts: int) -> dict:
  """{name: ShapeDtypeStruct [n_layers, ...]} of the taps."""
  width = {"d": d, "f": f}
  n = len(spec.layer_pool)
  shapes = {k: jax.ShapeDtypeStruct((n, spec.rows, width[w]), spec.dtype)
            for k, w in TAP_WIDTHS.items()}
  shapes["gs"] = jax.ShapeDtypeStruct((n, spec.shards, n_experts), jnp.float32)
  return shapes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def make_taps(w_gate, w_up, w_down, spec: TapSpec):
  """Zero taps {name: [n_layers, ...]} for layers whose pools are spec.layer_pool[l]; the pool
  weights' gradient is computed from the taps' cotangents (module docstring).

  w_gate, w_up: [n_pools, M, d, f]; w_down: [n_pools, M, f, d]."""
  _, m, d, f = w_gate.shape
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in tap_shapes(spec, d, f, m).items()}


def _make_taps_fwd(w_gate, w_up, w_down, spec):
  like = tuple(jnp.zeros((), w.dtype) for w in (w_gate, w_up, w_down))
  return make_taps(w_gate, w_up, w_down, spec), like


def _make_taps_bwd(spec, like, ct):
  grads = {n: [] for n in WEIGHTS}
  for p in range(max(spec.layer_pool) + 1):
    layers = [l for l, q in enumerate(spec.layer_pool) if q == p]
    g = _sharded_pool_gradient({k: v[layers[0]:layers[-1] + 1] for k, v in ct.items()}, spec)
    for n in WEIGHTS:
      grads[n].append(g[n])
  return tuple(jnp.stack(grads[n]).astype(z.dtype) for n, z in zip(WEIGHTS, like))


make_taps.defvjp(_make_taps_fwd, _make_taps_bwd)


def _sharded_pool_gradient(taps: dict, spec: TapSpec) -> dict:
  """pool_gradient of one pool's layers; on a data-parallel mesh each device contracts its own
  rows (the tgmm is a kernel XLA cannot partition) and the results are summed."""
  local = lambda t: pool_gradient(dict(t, gs=t["gs"][:, 0]), spec.implementation)
  if spec.embed_axis is not None:
    return _split_pool_gradient(taps, spec, local)
  if not spec.tok_axes:
    return local(taps)
  from jax.sharding import PartitionSpec as P
  mesh = sharding.current_mesh()
  rows = P(None, spec.tok_axes)
  fn = sharding.shard_map(lambda t: jax.lax.psum(local(t), spec.tok_axes), mesh,
                          ({k: rows for k in taps},), P())
  return fn(taps)


def _split_pool_gradient(taps: dict, spec: TapSpec, local) -> dict:
  """Taps of layers that ran with the experts split over d on spec.embed_axis: each device
  gathers the f-wide taps of its rows over the axis and contracts them with its own d block,
  which gives exactly its block of the pool gradient (the d axis of the weights is split there
  anyway); the row shards (data) are summed."""
  from jax.sharding import PartitionSpec as P
  mesh = sharding.current_mesh()
  ax, tok = spec.embed_axis, spec.tok_axes
  row = P(None, tok if tok else None, ax)

  def fn(t):
    t = dict(t, **{n: jax.lax.all_gather(t[n], ax, axis=2, tiled=True)
                   for n in ("h", "dg", "du")})
    g = local(t)
    return jax.lax.psum(g, tok) if tok else g

  in_specs = ({n: (P(None, (*tok, ax)) if n == "gs" else row) for n in taps},)
  out_specs = {"w_gate": P(None, ax, None), "w_up": P(None, ax, None), "w_down": P(None, None, ax)}
  return sharding.shard_map(fn, mesh, in_specs, out_specs)(taps)


def row_experts(group_sizes, rows: int):
  """group_sizes [layers, M] (float or int) -> expert of every row [layers, rows] int32, -1
  past the groups (rows of each layer sorted by expert)."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32), axis=1)              # [layers, M]
  r = jnp.arange(rows, dtype=jnp.int32)
  e = jnp.sum(r[None, :, None] >= ends[:, None, :], axis=-1).astype(jnp.int32)
  return jnp.where(e < group_sizes.shape[1], e, -1)


def pool_gradient(taps: dict, implementation=None) -> dict:
  """The tap cotangents of the layers of one pool {name: [layers, rows, ...], gs: [layers, M]}
  -> the pool's gradient {w_gate, w_up: [M, d, f], w_down: [M, f, d]} in f32: the rows of every
  layer sorted by expert once (stable: layer order inside an expert), then one tgmm per
  weight."""
  n_layers, rows = taps["xs"].shape[:2]
  m = taps["gs"].shape[1]
  ids = row_experts(taps["gs"], rows).reshape(-1, 1)
  sort_idx, sizes = ops.gmm.sort_by_group(ids, m)
  # sort_idx is a permutation: jnp.take's default fill mode would add a bounds mask and a NaN
  # select over all layers' rows
  flat = {n: taps[n].reshape(n_layers * rows, -1).at[sort_idx].get(
      mode="promise_in_bounds", unique_indices=True) for n in TAP_WIDTHS}
  tg = functools.partial(ops.gmm.tgmm, group_sizes=sizes, preferred_element_type=jnp.float32,
                         implementation=implementation)
  return {"w_gate": tg(flat["xs"], flat["dg"]), "w_up": tg(flat["xs"], flat["du"]),
          "w_down": tg(flat["h"], flat["dy"])}
