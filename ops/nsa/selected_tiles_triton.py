"""NSA selected attention in Pallas (Triton lowering, GPU) with several queries per step
(NSABlockConfig.sel_block_q > 1); ops/nsa/pallas_triton.py calls these instead of its
one-query kernels.

- forward / dq: a program owns sel_block_q consecutive queries x the GQA group's heads (rows,
  query-major) and walks the union of their selected blocks, loading each once for all of them
  (neighbouring queries mostly choose the same blocks); a row is masked off the blocks its
  query did not choose, so the answer equals the one-query kernels'.
- dk / dv: a work item (one block, a run of the sorted queries that chose it) gathers
  sel_block_q of its queries per step, so the products are sel_block_q times wider.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops.nsa.kernel_common import dot as _dot
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import online_softmax_step as _online
from ops.nsa.kernel_common import pad_axis as _pad_axis
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import triton_compiler as _compiler

_F32 = jnp.float32


def _tile_rows(idx_ref, qseg_ref, blk, t0, qt, gp, has_seg):
  """Rows of a query-tile program are (query, head) pairs, query-major: for block `blk` ->
  (rows that selected it [qt*gp] bool, their query positions [qt*gp] int32, their segment ids
  or None)."""
  chose = jnp.max((idx_ref[...] == blk).astype(jnp.int32), axis=1) > 0           # [qt]
  rows = lambda x: jnp.broadcast_to(x[:, None], (qt, gp)).reshape(qt * gp)
  tq = t0 + _iota(qt)
  qs = rows(qseg_ref[pl.ds(t0, qt)]) if has_seg else None
  return rows(chose), rows(tq), qs


def _tile_logits(q, k_ref, kseg_ref, blk, off, bk, sel, tq, qs, scale, prec):
  """Masked logits [rows, bk] of the rows `sel` against keys [off, off + bk) of block blk."""
  s = _dot(q, k_ref[pl.ds(off, bk), :], prec, tb=True) * scale
  ok = sel[:, None] & ((off + _iota(bk))[None, :] <= tq[:, None]) & (blk >= 0)
  if qs is not None:
    ok = ok & (kseg_ref[pl.ds(off, bk)][None, :] == qs[:, None])
  return s, ok


def _over_union(union_ref, idx_ref, qseg_ref, step, init, *, t0, qt, gp, ls, bk, has_seg):
  """Loop of a query-tile program over the union of its queries' blocks, bk keys at a time:
  carry = step(block, first key, rows that chose the block, their query positions, their
  segment ids, carry)."""
  def body(i, carry):
    blk = union_ref[i]
    sel, tq, qs = _tile_rows(idx_ref, qseg_ref, blk, t0, qt, gp, has_seg)
    start = jnp.maximum(blk, 0) * ls
    for c in range(ls // bk):
      carry = step(blk, start + c * bk, sel, tq, qs, carry)
    return carry

  return lax.fori_loop(0, _n_union(union_ref), body, init)


def fwd_kernel(union_ref, idx_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref,
                         o_ref, lse_ref, *, scale, ls, bk, has_seg, prec):
  """One program: qt query positions x the group's gp head rows, against the union of their
  selected blocks (each block loaded once for all of them; a row sees the blocks its query
  chose)."""
  qt, gp, dp = q_ref.shape
  t0 = pl.program_id(0) * qt
  q = q_ref[...].reshape(qt * gp, dp)
  dv = v_ref.shape[-1]

  def step(blk, off, sel, tq, qs, carry):
    s, ok = _tile_logits(q, k_ref, kseg_ref, blk, off, bk, sel, tq, qs, scale, prec)
    return _online(jnp.where(ok, s, -jnp.inf), v_ref[pl.ds(off, bk), :], carry, prec)

  init = (jnp.full((qt * gp,), -jnp.inf, _F32), jnp.zeros((qt * gp,), _F32),
          jnp.zeros((qt * gp, dv), _F32))
  m, l, acc = _over_union(union_ref, idx_ref, qseg_ref, step, init, t0=t0, qt=qt, gp=gp, ls=ls,
                          bk=bk, has_seg=has_seg)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype).reshape(qt, gp, dv)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), -jnp.inf).reshape(qt, gp)


def dq_kernel(union_ref, idx_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref,
                        do_ref, lse_ref, delta_ref, dq_ref, *, scale, ls, bk, has_seg, prec):
  """dq of a query-tile program (rows and blocks as in fwd_kernel)."""
  qt, gp, dp = q_ref.shape
  t0 = pl.program_id(0) * qt
  q = q_ref[...].reshape(qt * gp, dp)
  do = do_ref[...].reshape(qt * gp, do_ref.shape[-1])
  lse = lse_ref[...].reshape(qt * gp)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  delta = delta_ref[...].reshape(qt * gp)

  def step(blk, off, sel, tq, qs, dq):
    s, ok = _tile_logits(q, k_ref, kseg_ref, blk, off, bk, sel, tq, qs, scale, prec)
    k = k_ref[pl.ds(off, bk), :]
    p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
    dp_ = _dot(do, v_ref[pl.ds(off, bk), :], prec, tb=True)
    return dq + _dot((p * (dp_ - delta[:, None])).astype(k.dtype), k, prec)

  dq = _over_union(union_ref, idx_ref, qseg_ref, step, jnp.zeros(q.shape, _F32), t0=t0, qt=qt,
                   gp=gp, ls=ls, bk=bk, has_seg=has_seg)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype).reshape(qt, gp, dp)


def dkv_kernel(item_ref, st_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref,
                         lse_ref, delta_ref, dk_ref, dv_ref, *, scale, ls, qt, has_seg, prec):
  """dk / dv partials of one work item (a block, entries [lo, hi) of the queries that chose
  it, sorted), qt queries per step gathered into [qt * gp] rows; entries past hi are masked."""
  blk, lo, hi = item_ref[0], item_ref[1], item_ref[2]
  start = jnp.maximum(blk, 0) * ls
  k = k_ref[pl.ds(start, ls), :]
  v = v_ref[pl.ds(start, ls), :]
  kpos = start + _iota(ls)
  kseg = kseg_ref[pl.ds(start, ls)] if has_seg else None
  gp = q_ref.shape[1]
  rows = lambda x: jnp.broadcast_to(x[:, None], (qt, gp)).reshape(qt * gp)
  flat = lambda x: x.reshape((qt * gp,) + x.shape[2:])

  def body(j, carry):
    dk, dv = carry
    e = lo + j * qt + _iota(qt)
    live = e < hi
    ts = jnp.where(live, st_ref[pl.ds(lo + j * qt, qt)], 0)
    q, do = flat(q_ref[ts]), flat(do_ref[ts])
    lse = flat(lse_ref[ts])
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    delta = flat(delta_ref[ts])
    ok = rows(live)[:, None] & (kpos[None, :] <= rows(ts)[:, None])
    if has_seg:
      ok = ok & (kseg[None, :] == rows(qseg_ref[ts])[:, None])
    s = _dot(q, k, prec, tb=True) * scale
    p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, prec, ta=True)
    ds = p * (_dot(do, v, prec, tb=True) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, prec, ta=True)
    return dk, dv

  dk, dv = lax.fori_loop(0, (hi - lo + qt - 1) // qt, body,
                         (jnp.zeros(dk_ref.shape, _F32), jnp.zeros(dv_ref.shape, _F32)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _n_union(union_ref):
  return jnp.sum((union_ref[...] >= 0).astype(jnp.int32))


def _union_blocks(idx, qt):
  """idx [b, tp, kvh, npad] (tp % qt == 0; -1 = no block) -> the distinct blocks of each tile
  of qt query positions, ascending, then -1: [b, tp/qt, kvh, pow2(qt*npad)] int32."""
  b, tp, hk, n = idx.shape
  big = jnp.iinfo(jnp.int32).max
  u = idx.reshape(b, tp // qt, qt, hk, n).transpose(0, 1, 3, 2, 4).reshape(b, tp // qt, hk, -1)
  u = jnp.sort(jnp.where(u >= 0, u, big), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(u[..., :1], bool), u[..., 1:] == u[..., :-1]], -1)
  u = jnp.sort(jnp.where(dup, big, u), axis=-1)
  return _pad_axis(jnp.where(u < big, u, -1), 3, _pow2(u.shape[-1], 1), -1)


def tile_call(kernel, name, row_arrays, outs, *, qt, t, kp, vp, idx, qseg, kseg, cfg,
               interpret):
  """pallas_call of a query-tile kernel over (query tiles, kv heads, batch). Its arguments:
  the union of the tile's blocks, the per-query block ids idx [b, t, kvh, npad], q, k, v,
  the query and key segment ids, the rest of row_arrays; then outs. row_arrays (q first)
  [b, t, kvh, gp, ...] and outs (shapes [b, t, kvh, ...]) get blocks of qt query positions.
  Pads t to a multiple of qt and slices the outputs back."""
  tq = -(-t // qt) * qt
  pad_t = lambda x, value=0: _pad_axis(x, 1, tq, value)
  idx = pad_t(idx, -1)
  union = _union_blocks(idx, qt)
  rows = [pad_t(x) for x in row_arrays]
  row_spec = lambda x: pl.BlockSpec((None, qt, None) + x.shape[3:],
                                    lambda i, j, z: (z, i, j) + (0,) * (x.ndim - 3))
  b, hk = idx.shape[0], idx.shape[2]
  whole = lambda x: pl.BlockSpec((None, x.shape[1], None, x.shape[3]),
                                 lambda i, j, z: (z, 0, j, 0))
  q_rows, *other_rows = rows
  in_specs = ([pl.BlockSpec((None, None, None, union.shape[-1]), lambda i, j, z: (z, i, j, 0)),
               row_spec(idx), row_spec(q_rows), whole(kp), whole(vp),
               pl.BlockSpec((None, tq), lambda i, j, z: (z, 0)),
               pl.BlockSpec((None, kseg.shape[1]), lambda i, j, z: (z, 0))]
              + [row_spec(x) for x in other_rows])
  out_shape = [jax.ShapeDtypeStruct((b, tq) + o.shape[2:], o.dtype) for o in outs]
  res = pl.pallas_call(
      kernel, grid=(tq // qt, hk, b), in_specs=in_specs,
      out_specs=[row_spec(o) for o in out_shape], out_shape=out_shape,
      interpret=interpret, name=name,
      **_compiler(interpret, cfg.sel_num_warps, cfg.sel_num_stages),
  )(union, idx, q_rows, kp, vp, pad_t(qseg, -1), kseg, *other_rows)
  return [r[:, :t] if tq != t else r for r in res]
