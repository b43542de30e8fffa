"""Expert pools and token dispatch through ops.gmm.

`ExpertPool` holds the FFN experts of every pool the model owns as stacked params
[n_pools, M, ...] (logical axes "pool", "expert", ...): one pool per layer for a vanilla MoE,
n_groups pools for UniPool (each shared by n_layers / n_groups consecutive layers). The model
owns it, outside the (possibly scanned) block stack, and hands each block its pool's arrays,
so a UniPool of M experts holds exactly M experts' params whatever the depth.

Dispatch (dropless): assignments are sorted by expert (ops.gmm.sort_by_group), the SwiGLU
experts run as three grouped matmuls, and results are unsorted and combined with the gates
(ops.gmm.unpermute). Assignments with id -1 (dropped by capacity, BlockFFN's inactive slots,
MoE++ non-FFN experts) are sorted past the groups and contribute zero.

Expert parallelism: when the ambient mesh has an "expert" axis of size ep > 1, a pool's M
experts are sharded M/ep per device and `dispatch_expert_parallel` moves token rows to the
owning device with an all-to-all inside shard_map, runs ops.gmm on the local experts and sends
the results back. The send buffers are padded to the worst case (every local assignment to one
device: tokens_local * k rows per destination), which keeps shapes static and the layer exactly
dropless at the cost of ep x buffer memory.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import ops.gmm
from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.layers import pool_grad
from jaxlm.layers.mlp import out_proj_std
from jaxlm.layers.params import param

# checkpoint_name of the experts' grouped-matmul outputs
EXPERT_DOTS = "expert_dots"


class ExpertPool(nnx.Module):
  """FFN experts (SwiGLU, width d_expert) of `n_pools` pools, plus MoE++ constant experts."""

  def __init__(self, cfg: ModelConfig, n_pools: int, *, rngs: nnx.Rngs):
    e = cfg.moe
    p, m, d, f = n_pools, e.n_experts, cfg.d_model, cfg.resolved_d_expert
    std, pd = cfg.init_std, cfg.param_dtype
    self.n_pools = p
    self.w_gate = param(rngs, (p, m, d, f), ("pool", "expert", "embed", "mlp"), std=std, dtype=pd)
    self.w_up = param(rngs, (p, m, d, f), ("pool", "expert", "embed", "mlp"), std=std, dtype=pd)
    self.w_down = param(rngs, (p, m, f, d), ("pool", "expert", "mlp", "embed"),
                        std=out_proj_std(std, cfg.n_layers), dtype=pd)
    if e.n_constant_experts:
      c = e.n_constant_experts
      self.const_w = param(rngs, (p, c, d, 2), ("pool", None, "embed", None), std=std, dtype=pd)
      self.const_v = param(rngs, (p, c, d), ("pool", None, "embed"), std=std, dtype=pd)

  def arrays(self) -> dict:
    """All pools as plain arrays {name: [n_pools, ...]}."""
    names = ("w_gate", "w_up", "w_down", "const_w", "const_v")
    return {n: getattr(self, n).value for n in names if hasattr(self, n)}


def pool_of_layer(layer: int, n_layers: int, n_pools: int) -> int:
  """Pool index used by `layer` (consecutive layers share a pool)."""
  return layer // (n_layers // n_pools)


# --------------------------------------------------------------------------- dispatch

def _saved_gmm(xs, w, group_sizes, implementation):
  """ops.gmm's output, named for the remat policies (jaxlm/models/stacking.py): a Pallas
  grouped matmul is not a dot_general, so checkpoint_dots alone would run it again in the
  backward.

  The optimization barrier keeps XLA's GPU dynamic-slice fusion from fusing the kernel into
  the write of the scan's saved residual: it then runs the kernel twice, once per consumer
  (unipool_469m, H200, session 19: 219 grouped-matmul launches a step instead of 147, 255 ms
  a step against 216 with the barrier or with --xla_gpu_enable_dynamic_slice_fusion=false)."""
  out = ops.gmm.gmm(xs, w, group_sizes, implementation=implementation)
  return checkpoint_name(jax.lax.optimization_barrier(out), EXPERT_DOTS)


def swiglu_grouped(xs, group_sizes, w_gate, w_up, w_down, implementation=None, align=0,
                   tap=None, embed_axis=None):
  """Rows xs [m, d] sorted by expert; w_* [E, d, f] / [E, f, d]; -> [m, d] (rows past the
  groups are zero). align > 1: the three grouped matmuls run on a zero-padded copy whose groups
  start at multiples of align (ops.gmm.aligned_layout), the result is read back in sorted
  order. tap: this layer's taps of the deferred pool gradient (jaxlm/layers/pool_grad.py; the
  weights then arrive under stop_gradient) or None. embed_axis: inside shard_map, the mesh axis
  that splits d (xs [m, d / n], w_gate / w_up [E, d / n, f], w_down [E, f, d / n]); the gate and
  up products are then partial sums, added over it in f32, and the result is [m, d / n]; the
  f-wide taps (pool_grad.TapSpec.embed_axis) then take this device's f / n block."""
  if tap is not None:
    if align > 1:
      raise ValueError("the deferred pool gradient needs group_align 0 or 1")
    xs = pool_grad.report_value(xs, tap["xs"], xs)
    xs = pool_grad.report_value(xs, tap["gs"], group_sizes.astype(jnp.float32)[None])
  if align > 1:
    src, dest, padded = ops.gmm.aligned_layout(group_sizes, xs.shape[0], align)
    y = swiglu_grouped(ops.gmm.pad_rows(xs, src, dest), padded, w_gate, w_up, w_down,
                       implementation, embed_axis=embed_axis)
    return ops.gmm.unpad_rows(y, src, dest)
  dt = xs.dtype
  if embed_axis is None:
    g = _saved_gmm(xs, w_gate.astype(dt), group_sizes, implementation)
    u = _saved_gmm(xs, w_up.astype(dt), group_sizes, implementation)
  else:
    gu = [ops.gmm.gmm(xs, w.astype(dt), group_sizes, preferred_element_type=jnp.float32,
                      implementation=implementation) for w in (w_gate, w_up)]
    if tap is not None:
      # the partial products' cotangent is the whole one (the psum's transpose sums the
      # devices' shares); after the psum each device only holds its share
      gu = [pool_grad.report_cotangent(v, tap[n], (embed_axis, tap[n].shape[-1]))
            for v, n in zip(gu, ("dg", "du"))]
    g, u = (checkpoint_name(v.astype(dt), EXPERT_DOTS)
            for v in jax.lax.psum(gu, embed_axis))
  if tap is not None and embed_axis is None:
    g = pool_grad.report_cotangent(g, tap["dg"])
    u = pool_grad.report_cotangent(u, tap["du"])
  h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(dt)
  if tap is not None:
    h = pool_grad.report_value(h, tap["h"], h,
                               None if embed_axis is None else (embed_axis, tap["h"].shape[-1]))
  y = _saved_gmm(h, w_down.astype(dt), group_sizes, implementation)
  return y if tap is None else pool_grad.report_cotangent(y, tap["dy"])


def ffn_ids(ids, n_ffn: int):
  """Ids of FFN experts, -1 for everything else (dropped, inactive, MoE++ experts)."""
  return jnp.where((ids >= 0) & (ids < n_ffn), ids, -1)


def dispatch(x, ids, gates, experts: dict, n_ffn: int, implementation=None, group_align=0,
             embed_axis=None):
  """Dropless FFN-expert output on one device. x [T, d]; ids/gates [T, k] -> [T, d].
  group_align: MoEConfig.group_align (swiglu_grouped's align); embed_axis: swiglu_grouped's
  (x and the result are then [T, d / n])."""
  fid = ffn_ids(ids, n_ffn)
  k = ids.shape[1]
  sort_idx, group_sizes = ops.gmm.sort_by_group(fid, n_ffn)
  xs = ops.gmm.permute(x, sort_idx, k)
  ys = swiglu_grouped(xs, group_sizes, experts["w_gate"], experts["w_up"], experts["w_down"],
                      implementation, group_align, experts.get("tap"), embed_axis)
  return ops.gmm.unpermute(ys, sort_idx, jnp.where(fid >= 0, gates, 0.0))


def expert_axis_size(mesh) -> int:
  if mesh is None or "expert" not in mesh.shape:
    return 1
  return int(mesh.shape["expert"])


def token_axes(mesh, n_tokens: int):
  """Mesh axes splitting the token dim inside shard_map: the batch axes and the expert axis
  when they divide the token count (else fewer; replicated tokens are still correct)."""
  for cand in (("data", "fsdp", "expert"), ("data", "fsdp"), ("data",), ()):
    axes = tuple(a for a in cand if mesh.shape.get(a, 1) > 1)
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if n_tokens % size == 0:
      return axes
  return ()


def split_embed_moves_less(group_rows: int, own_rows: int, d: int, f: int,
                           n_experts: int) -> bool:
  """Whether keeping the experts split over d on the fsdp axis (activations move) moves fewer
  elements per device in one layer's forward than gathering its experts' weights (FSDP).
  group_rows: the expert rows of the whole fsdp group, whose gate / up products each device
  computes; own_rows: the rows a device moves in and out along d; f: expert width per device.
  Gathering moves 3 E d f (n-1)/n; the split moves the gate and up partial sums (all-reduced in
  f32: 2 x 2 x 2 group_rows f (n-1)/n in bf16 units) and the rows (2 own_rows d (n-1)/n).

  Decode (a few tokens against a pool of 2.4 B params for unipool_469m) always splits; vanilla
  MoE training (8 experts a layer against 16k tokens) always gathers."""
  return group_rows * 8 * f + 2 * own_rows * d < 3 * n_experts * d * f


def fsdp_split_embed(mode: str, mesh, n_tokens: int, k: int, d: int, f: int, n_experts: int,
                     deferred: bool) -> bool:
  """MoEConfig.fsdp_dispatch resolved for a layer of n_tokens tokens: True = the experts stay
  split over d on the fsdp axis (`dispatch_data_parallel`). auto picks the split where it is
  possible and moves less; a forced split that cannot run is refused by name. deferred: the
  layer reports taps of the deferred pool gradient (they split the expert width f too, and
  need each token row on one data shard)."""
  fsdp = int(mesh.shape.get("fsdp", 1))
  if mode == "gather_weights" or fsdp == 1:
    return False
  data = int(mesh.shape.get("data", 1))
  why = None
  if d % fsdp:
    why = f"d_model {d} does not divide over fsdp={fsdp}"
  elif deferred and f % fsdp:
    why = (f"the expert width {f} does not divide over fsdp={fsdp} (the deferred pool "
           f"gradient's taps split it)")
  elif deferred and n_tokens % data:
    why = (f"{n_tokens} tokens do not divide over data={data} (the deferred pool gradient's "
           f"taps need each row on one data shard)")
  if mode == "split_embed":
    if why:
      raise ValueError(f"model.moe.fsdp_dispatch='split_embed': {why}")
    return True
  group = n_tokens // data if n_tokens % data == 0 else n_tokens
  return why is None and split_embed_moves_less(group * k, group, d, f, n_experts)


def deferred_tap_layout(mode: str, mesh, n_tokens: int, k: int, d: int, f: int,
                        n_experts: int) -> dict:
  """pool_grad.TapSpec's layout fields for a model on `mesh` ({} on one device): rows over the
  token axes, or, where the layers run split (fsdp_split_embed), rows over "data" and widths
  over "fsdp"."""
  if mesh is None:
    return {}
  if fsdp_split_embed(mode, mesh, n_tokens, k, d, f, n_experts, deferred=True):
    tok = ("data",) if mesh.shape.get("data", 1) > 1 else ()
    return dict(tok_axes=tok, shards=math.prod(mesh.shape[a] for a in (*tok, "fsdp")),
                embed_axis="fsdp")
  tok = token_axes(mesh, n_tokens)
  return dict(tok_axes=tok, shards=math.prod(mesh.shape[a] for a in tok))


def dispatch_data_parallel(x, ids, gates, experts: dict, n_ffn: int, mesh, implementation=None,
                           group_align=0, fsdp_dispatch="auto"):
  """`dispatch` on a multi-device mesh without an expert axis: each device runs the grouped
  matmuls (ops.gmm: kernels XLA cannot partition) on its own tokens, with every expert's
  weights gathered (FSDP) except the expert width, which stays split over "tensor" (the
  partial outputs are summed across it).

  With `fsdp_split_embed` (fsdp_dispatch; decode, or pools far larger than the batch) the
  weights are not gathered: they stay split over d on "fsdp", each device takes the tokens of
  its data shard with its slice of d, the gate / up products are summed over "fsdp" and the
  result comes back split over d."""
  from jax.sharding import PartitionSpec as P
  tp = int(mesh.shape.get("tensor", 1))
  split = tp > 1 and experts["w_gate"].shape[-1] % tp == 0
  tap = experts.get("tap")
  f_local = experts["w_gate"].shape[-1] // (tp if split else 1)
  if fsdp_split_embed(fsdp_dispatch, mesh, x.shape[0], ids.shape[1], x.shape[1], f_local,
                      experts["w_gate"].shape[0], tap is not None):
    return _dispatch_split_embed(x, ids, gates, experts, n_ffn, mesh, implementation,
                                 group_align, split)
  tok = token_axes(mesh, x.shape[0])
  tok_spec = P(tok if tok else None)
  w_in, w_out = (P(None, None, "tensor"), P(None, "tensor", None)) if split else (P(), P())

  if tap is not None:
    # the taps' cotangents must come out once per row: replicated rows or expert columns split
    # over "tensor" would be summed over the copies by shard_map's transpose
    busy = {a for a, n in mesh.shape.items() if n > 1}
    if split or busy - set(tok):
      raise ValueError(f"model.moe.pool_grad='deferred' needs the tokens ({x.shape[0]}) split "
                       f"over every mesh axis and no tensor axis; mesh {dict(mesh.shape)}, "
                       f"tokens over {tok}")

  def local(x, ids, gates, w_gate, w_up, w_down, tap):
    w = dict(w_gate=w_gate, w_up=w_up, w_down=w_down)
    y = dispatch(x, ids, gates, dict(w, tap=tap) if tap else w, n_ffn, implementation,
                 group_align)
    return jax.lax.psum(y, "tensor") if split else y

  tap = tap or {}
  fn = sharding.shard_map(local, mesh, (tok_spec, tok_spec, tok_spec, w_in, w_in, w_out,
                                        {k: tok_spec for k in tap}), tok_spec)
  return fn(x, ids, gates, experts["w_gate"], experts["w_up"], experts["w_down"], tap)


def _dispatch_split_embed(x, ids, gates, experts: dict, n_ffn: int, mesh, implementation,
                          group_align, split: bool):
  """dispatch_data_parallel with the experts left split over d on "fsdp" (and over the expert
  width on "tensor" when `split`): tokens over "data" only. Taps of the deferred pool gradient
  (deferred_tap_layout) come split over "data" by rows and over "fsdp" by width."""
  from jax.sharding import PartitionSpec as P
  data = int(mesh.shape.get("data", 1))
  tok = "data" if data > 1 and x.shape[0] % data == 0 else None
  tp = "tensor" if split else None
  w_in, w_out = P(None, "fsdp", tp), P(None, tp, "fsdp")
  tap = experts.get("tap") or {}
  tap_specs = {n: P((tok, "fsdp") if tok else "fsdp") if n == "gs" else P(tok, "fsdp")
               for n in tap}

  def local(x, ids, gates, w_gate, w_up, w_down, tap):
    w = dict(w_gate=w_gate, w_up=w_up, w_down=w_down)
    y = dispatch(x, ids, gates, dict(w, tap=tap) if tap else w, n_ffn, implementation,
                 group_align, embed_axis="fsdp")
    return jax.lax.psum(y, "tensor") if split else y

  fn = sharding.shard_map(local, mesh, (P(tok, "fsdp"), P(tok), P(tok), w_in, w_in, w_out,
                                        tap_specs), P(tok, "fsdp"))
  return fn(x, ids, gates, experts["w_gate"], experts["w_up"], experts["w_down"], tap)


def ep_split_embed(mode: str, mesh, tok: tuple, rows: int, d: int, f: int,
                   n_local: int) -> bool:
  """fsdp_dispatch for `dispatch_expert_parallel` on a mesh that also has an fsdp axis: True =
  each device's experts stay split over d on "fsdp" and the rows it receives move across the
  fsdp group instead. rows: the (padded) rows one device receives from the expert all-to-all;
  auto: split_embed_moves_less for the group's fsdp x rows."""
  fsdp = int(mesh.shape.get("fsdp", 1))
  if mode == "gather_weights" or fsdp == 1:
    return False
  why = None
  if "fsdp" not in tok:
    why = "the tokens are not split over fsdp"
  elif d % fsdp:
    why = f"d_model {d} does not divide over fsdp={fsdp}"
  if mode == "split_embed":
    if why:
      raise ValueError(f"model.moe.fsdp_dispatch='split_embed' with an expert axis: {why}")
    return True
  return why is None and split_embed_moves_less(fsdp * rows, rows, d, f, n_local)


def dispatch_expert_parallel(x, ids, gates, experts: dict, n_ffn: int, mesh,
                             implementation=None, group_align=0, fsdp_dispatch="auto"):
  """Same result as `dispatch`, with the experts sharded over the mesh's "expert" axis. On a
  mesh that also has "fsdp", `ep_split_embed` may keep each device's experts split over d: the
  rows received from the expert all-to-all then go to every device of the fsdp group as d
  slices (all-to-all), the gate / up products are summed over the group, and each device's d
  slice of the outputs goes back to the rows' owner (all-to-all)."""
  from jax.sharding import PartitionSpec as P
  ep = expert_axis_size(mesh)
  if n_ffn % ep:
    raise ValueError(f"{n_ffn} experts do not divide over the expert axis of size {ep}")
  n_local = n_ffn // ep
  tok = token_axes(mesh, x.shape[0])
  tok_spec = P(tok if tok else None)
  t_local = x.shape[0] // math.prod(mesh.shape[a] for a in tok)
  split = ep_split_embed(fsdp_dispatch, mesh, tok, ep * t_local * ids.shape[1], x.shape[1],
                         experts["w_gate"].shape[-1], n_local)
  w_in, w_out = ((P("expert", "fsdp"), P("expert", None, "fsdp")) if split
                 else (P("expert"), P("expert")))

  def local(x, ids, gates, w_gate, w_up, w_down):
    t, k = ids.shape
    cap = t * k  # worst case rows one device can send to one destination
    fid = ffn_ids(ids, n_ffn)
    sort_idx, group_sizes = ops.gmm.sort_by_group(fid, n_ffn)
    xs = ops.gmm.permute(x, sort_idx, k)                       # [t*k, d], by expert
    ids_sorted = jnp.take(fid.reshape(-1), sort_idx)
    counts = group_sizes.reshape(ep, n_local).sum(axis=1)      # rows for each destination
    starts = jnp.cumsum(counts) - counts
    r = jnp.arange(cap, dtype=jnp.int32)
    src = starts[:, None] + r[None, :]                          # [ep, cap] rows of xs
    valid = r[None, :] < counts[:, None]
    src_c = jnp.clip(src, 0, cap - 1)
    send_x = jnp.where(valid[..., None], jnp.take(xs, src_c, axis=0), 0).astype(x.dtype)
    dest = jnp.arange(ep, dtype=jnp.int32)[:, None]
    send_id = jnp.where(valid, jnp.take(ids_sorted, src_c) - dest * n_local, -1)
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0)        # [ep, cap, d] from each source
    recv_id = jax.lax.all_to_all(send_id, "expert", 0, 0)
    rows = recv_x.reshape(ep * cap, -1)
    row_ids = recv_id.reshape(-1, 1)
    if split:   # the fsdp group's rows, each device with its d slice: [fsdp * ep * cap, d / n]
      rows = jax.lax.all_to_all(rows, "fsdp", 1, 0, tiled=True)
      row_ids = jax.lax.all_gather(row_ids, "fsdp", tiled=True)
    l_idx, l_sizes = ops.gmm.sort_by_group(row_ids, n_local)
    h = swiglu_grouped(ops.gmm.permute(rows, l_idx, 1), l_sizes, w_gate, w_up, w_down,
                       implementation, group_align, embed_axis="fsdp" if split else None)
    h = ops.gmm.permute_rows(h, ops.gmm.inverse_permutation(l_idx), l_idx)  # receive order
    if split:   # this device's rows back, all d slices: [ep * cap, d]
      h = jax.lax.all_to_all(h, "fsdp", 0, 1, tiled=True)
    back = jax.lax.all_to_all(h.reshape(ep, cap, -1), "expert", 0, 0)
    dst = jnp.where(valid, src, cap).reshape(-1)
    ys = jnp.zeros((cap, x.shape[1]), back.dtype).at[dst].set(
        back.reshape(ep * cap, -1), mode="drop")
    return ops.gmm.unpermute(ys, sort_idx, jnp.where(fid >= 0, gates, 0.0))

  fn = sharding.shard_map(local, mesh, (tok_spec, tok_spec, tok_spec, w_in, w_in, w_out),
                          tok_spec)
  return fn(x, ids, gates, experts["w_gate"], experts["w_up"], experts["w_down"])


def extra_experts(x, ids, gates, experts: dict, n_ffn: int, n_zero: int, n_copy: int,
                  n_const: int):
  """MoE++ zero / copy / constant experts' combined output [T, d] (ids after the FFN ones:
  zero experts, then copy, then constant). zero: E(x)=0; copy: E(x)=x; constant j:
  E(x) = a1 x + a2 v_j with [a1, a2] = softmax(W_c_j x)."""
  xf = x.astype(jnp.float32)
  out = jnp.zeros_like(xf)
  g = gates.astype(jnp.float32)
  if n_copy:
    lo = n_ffn + n_zero
    w = jnp.sum(jnp.where((ids >= lo) & (ids < lo + n_copy), g, 0.0), axis=-1)
    out = out + w[:, None] * xf
  if n_const:
    lo = n_ffn + n_zero + n_copy
    onehot = (ids[:, :, None] == lo + jnp.arange(n_const)[None, None, :])
    w = jnp.sum(jnp.where(onehot, g[:, :, None], 0.0), axis=1)          # [T, C]
    a = jax.nn.softmax(jnp.einsum("td,cdo->tco", xf, experts["const_w"].astype(jnp.float32)),
                       axis=-1)                                        # [T, C, 2]
    out = out + jnp.einsum("tc,td->td", w * a[..., 0], xf)
    out = out + jnp.einsum("tc,cd->td", w * a[..., 1], experts["const_v"].astype(jnp.float32))
  return out.astype(x.dtype)
