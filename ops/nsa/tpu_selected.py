"""NSA selected-block attention for TPUs in Pallas (Mosaic): the fwd, dq and dk/dv kernels.

Selected attention is group-centric and tiled: a program owns `tpu_block_q` consecutive query
positions and ALL query heads of one GQA group (rows = heads x positions, so the MXU sees
g*bq rows). The tile's selected blocks are the union of its queries' choices (sorted, unique,
computed in XLA) and reach the kernel by scalar prefetch (`PrefetchScalarGridSpec`): the K/V
BlockSpecs index by the union entry, so the pipeline DMAs only the chosen select_len-key
blocks. Each row keeps only the keys of blocks its own query chose (membership test against
the tile's block_idx rows), causal inside the block, same segment. The union axis is the
innermost grid axis with a static length U = min(bq * n_select, n_blocks); slots past a tile's
union size repeat its last block (no new DMA) and skip compute.

dk / dv use the inverse map without atomics: the (tile, block) pairs of the unions are sorted
by block (XLA sort, stable), and a grid over the sorted pairs visits all tiles that chose a
block consecutively, so the block's f32 dk / dv output tile stays resident and accumulates
(it is written back when the block changes). The outputs alias zero-initialised inputs, so
blocks nobody chose stay zero, and calls over successive query chunks (bounding the scalar-
prefetch arrays, which live in SMEM, by `tpu_prefetch_max` entries) accumulate in place.
No tensor of size T x T is formed anywhere.

Cost note: the grid has b * kvh * (t / bq) * U steps per call whatever the union sizes are;
skipped slots cost only the per-step overhead (no DMA, no compute).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.nsa.tpu_common import _F32, _dims, _nn, _nt, _prec
from ops.nsa.tpu_selected_layout import _Geom, _pairs


# ----------------------------------------------------------------------------- kernels
def _tile_mask(blk, tile, idx_ref, qseg_ref, kseg_ref, *, bq, ls):
  """(bq, ls) visibility of block `blk`'s keys to the tile's queries."""
  qpos = tile * bq + lax.broadcasted_iota(jnp.int32, (bq, ls), 0)
  kpos = blk * ls + lax.broadcasted_iota(jnp.int32, (bq, ls), 1)
  chosen = jnp.max((idx_ref[...] == blk).astype(_F32), axis=1, keepdims=True) > 0.0
  ok = (kpos <= qpos) & chosen
  if qseg_ref is not None:
    ok = ok & (qseg_ref[...] == kseg_ref[pl.ds(blk, 1), :])
  return ok


def _apply(ok, x, fill, g, bq, ls):
  """x (g*bq, ls) with rows (head, position): where(ok per position, x, fill)."""
  return jnp.where(ok[None], x.reshape(g, bq, ls), fill).reshape(g * bq, ls)


def _fwd_kernel(off_ref, u_ref, cnt_ref, *refs, g, bq, ls, scale, has_seg, prec):
  q_ref, k_ref, v_ref, idx_ref = refs[:4]
  rest = refs[4:]
  qseg_ref = kseg_ref = None
  if has_seg:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  _, _, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
  bi, hi, ti, ui = (pl.program_id(i) for i in range(4))

  @pl.when(ui == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when(ui < cnt_ref[bi, hi, ti])
  def _step():
    blk = u_ref[bi, hi, ti, ui]
    q = q_ref[...].reshape(g * bq, q_ref.shape[-1])
    v = v_ref[...]
    s = _nt(q, k_ref[...], prec) * scale
    ok = _tile_mask(blk, off_ref[0] + ti, idx_ref, qseg_ref, kseg_ref, bq=bq, ls=ls)
    s = _apply(ok, s, -jnp.inf, g, bq, ls)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_use)
    p = jnp.exp(s - m_use)
    l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + _nn(p.astype(v.dtype), v, prec)
    m_sc[...] = m_new

  @pl.when(ui == pl.num_programs(3) - 1)
  def _done():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / l_safe).reshape(o_ref.shape).astype(o_ref.dtype)
    m = m_sc[...]
    lse = jnp.where(empty, -jnp.inf, jnp.where(m == -jnp.inf, 0.0, m) + jnp.log(l_safe))
    lse_ref[...] = lse.reshape(lse_ref.shape)


def _dq_kernel(off_ref, u_ref, cnt_ref, *refs, g, bq, ls, scale, has_seg, prec):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref = refs[:7]
  rest = refs[7:]
  qseg_ref = kseg_ref = None
  if has_seg:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  _, dq_ref, dq_sc = rest
  bi, hi, ti, ui = (pl.program_id(i) for i in range(4))
  r = g * bq

  @pl.when(ui == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  @pl.when(ui < cnt_ref[bi, hi, ti])
  def _step():
    blk = u_ref[bi, hi, ti, ui]
    q = q_ref[...].reshape(r, q_ref.shape[-1])
    do = do_ref[...].reshape(r, do_ref.shape[-1])
    k = k_ref[...]
    s = _nt(q, k, prec) * scale
    ok = _tile_mask(blk, off_ref[0] + ti, idx_ref, qseg_ref, kseg_ref, bq=bq, ls=ls)
    p = _apply(ok, jnp.exp(s - lse_ref[...].reshape(r, 1)), 0.0, g, bq, ls)
    ds = p * (_nt(do, v_ref[...], prec) - delta_ref[...].reshape(r, 1))
    dq_sc[...] += _nn(ds.astype(k.dtype), k, prec)

  @pl.when(ui == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, sb_ref, st_ref, nval_ref, *refs, g, bq, ls, scale, has_seg, prec):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref = refs[:7]
  rest = refs[7:]
  qseg_ref = kseg_ref = None
  if has_seg:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  dk_in, dv_in, dk_ref, dv_ref = rest
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  blk = sb_ref[bi, hi, pi]
  r = g * bq

  @pl.when((pi == 0) | (blk != sb_ref[bi, hi, jnp.maximum(pi - 1, 0)]))
  def _first():      # first visit of this block in this call: resume its running sums
    dk_ref[...] = dk_in[...]
    dv_ref[...] = dv_in[...]

  @pl.when(pi < nval_ref[bi, hi])
  def _step():
    tile = off_ref[0] + st_ref[bi, hi, pi]
    q = q_ref[...].reshape(r, q_ref.shape[-1])
    do = do_ref[...].reshape(r, do_ref.shape[-1])
    s = _nt(q, k_ref[...], prec) * scale
    ok = _tile_mask(blk, tile, idx_ref, qseg_ref, kseg_ref, bq=bq, ls=ls)
    p = _apply(ok, jnp.exp(s - lse_ref[...].reshape(r, 1)), 0.0, g, bq, ls)   # (r, ls)
    dv_ref[...] += _nn(p.T.astype(do.dtype), do, prec)
    ds = p * (_nt(do, v_ref[...], prec) - delta_ref[...].reshape(r, 1))
    dk_ref[...] += _nn(ds.T.astype(q.dtype), q, prec) * scale


# ----------------------------------------------------------------------------- calls
def _chunk(x, c, geo, axis=2):
  """Chunk c (traced) of a [..., nch, ...] prefetch array along `axis`."""
  return lax.dynamic_index_in_dim(x, c, axis, keepdims=False)


def _seg_specs(segs, geo, tile_of):
  if segs is None:
    return []
  return [pl.BlockSpec((None, geo.bq, 1), lambda *a: (a[0], tile_of(*a), 0)),
          pl.BlockSpec((None, geo.nblk, geo.ls), lambda *a: (a[0], 0, 0))]


def _loop_chunks(geo, body, init):
  if geo.nch == 1:
    return body(0, init)
  return lax.fori_loop(0, geo.nch, body, init)


def _fwd(q5, k4, v4, idx, segs, u, cnt, geo: _Geom, *, scale, interpret):
  b, hk, g, bq, ls, d, dv, ct, nu = geo.b, geo.hk, geo.g, geo.bq, geo.ls, geo.d, geo.dv, \
      geo.ct, geo.u
  has_seg = segs is not None
  u5 = u.reshape(b, hk, geo.nch, ct, nu)
  c4 = cnt.reshape(b, hk, geo.nch, ct)
  qmap = lambda bi, hi, ti, ui, off, *_: (bi, hi, 0, off[0] + ti, 0)
  kmap = lambda bi, hi, ti, ui, off, uref, _c: (bi, hi, uref[bi, hi, ti, ui], 0)
  in_specs = [pl.BlockSpec((None, None, g, bq, d), qmap),
              pl.BlockSpec((None, None, ls, d), kmap),
              pl.BlockSpec((None, None, ls, dv), kmap),
              pl.BlockSpec((None, None, bq, geo.n), lambda bi, hi, ti, ui, off, *_:
                           (bi, hi, off[0] + ti, 0))]
  in_specs += _seg_specs(segs, geo, lambda bi, hi, ti, ui, off, *_: off[0] + ti)
  in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 2
  n_in = 3 + 4 + (2 if has_seg else 0)
  call = pl.pallas_call(
      functools.partial(_fwd_kernel, g=g, bq=bq, ls=ls, scale=scale, has_seg=has_seg,
                        prec=_prec(q5.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, hk, ct, nu), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, g, bq, dv), qmap),
                     pl.BlockSpec((None, None, g, bq, 1), qmap)],
          scratch_shapes=[pltpu.VMEM((g * bq, 1), _F32), pltpu.VMEM((g * bq, 1), _F32),
                          pltpu.VMEM((g * bq, dv), _F32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hk, g, geo.tq, dv), q5.dtype),
                 jax.ShapeDtypeStruct((b, hk, g, geo.tq, 1), _F32)],
      input_output_aliases={n_in: 0, n_in + 1: 1},
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="nsa_selected_fwd_tpu")
  extra = list(segs) if has_seg else []

  def body(c, carry):
    o, lse = carry
    off = jnp.reshape(c * ct, (1,)).astype(jnp.int32)
    return tuple(call(off, _chunk(u5, c, geo), _chunk(c4, c, geo), q5, k4, v4, idx, *extra,
                      o, lse))

  init = (jnp.zeros((b, hk, g, geo.tq, dv), q5.dtype),
          jnp.zeros((b, hk, g, geo.tq, 1), _F32))
  return _loop_chunks(geo, body, init)


def _bwd(q5, k4, v4, idx, segs, u, cnt, o5, lse5, do5, dlse5, geo: _Geom, *, scale,
         interpret):
  b, hk, g, bq, ls, d, dv, ct, nu = geo.b, geo.hk, geo.g, geo.bq, geo.ls, geo.d, geo.dv, \
      geo.ct, geo.u
  has_seg = segs is not None
  prec = _prec(q5.dtype)
  extra = list(segs) if has_seg else []
  delta = jnp.sum(o5.astype(_F32) * do5.astype(_F32), axis=-1, keepdims=True)
  finite = jnp.isfinite(lse5)
  if dlse5 is not None:
    delta = delta - jnp.where(finite, dlse5, 0.0)
  lse_b = jnp.where(finite, lse5, jnp.inf)            # rows with no key: p = 0

  # dq: same grid as the forward.
  u5 = u.reshape(b, hk, geo.nch, ct, nu)
  c4 = cnt.reshape(b, hk, geo.nch, ct)
  qmap = lambda bi, hi, ti, ui, off, *_: (bi, hi, 0, off[0] + ti, 0)
  kmap = lambda bi, hi, ti, ui, off, uref, _c: (bi, hi, uref[bi, hi, ti, ui], 0)
  in_specs = [pl.BlockSpec((None, None, g, bq, d), qmap),
              pl.BlockSpec((None, None, ls, d), kmap),
              pl.BlockSpec((None, None, ls, dv), kmap),
              pl.BlockSpec((None, None, g, bq, dv), qmap),
              pl.BlockSpec((None, None, g, bq, 1), qmap),
              pl.BlockSpec((None, None, g, bq, 1), qmap),
              pl.BlockSpec((None, None, bq, geo.n), lambda bi, hi, ti, ui, off, *_:
                           (bi, hi, off[0] + ti, 0))]
  in_specs += _seg_specs(segs, geo, lambda bi, hi, ti, ui, off, *_: off[0] + ti)
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
  n_in = 3 + 7 + len(extra)
  dq_call = pl.pallas_call(
      functools.partial(_dq_kernel, g=g, bq=bq, ls=ls, scale=scale, has_seg=has_seg, prec=prec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, hk, ct, nu), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, g, bq, d), qmap),
          scratch_shapes=[pltpu.VMEM((g * bq, d), _F32)]),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      input_output_aliases={n_in: 0},
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="nsa_selected_dq_tpu")

  # dk / dv: grid over the (block, tile) pairs sorted by block.
  sb, st, nval = _pairs(u, cnt, geo)
  npair = ct * nu
  tmap = lambda bi, hi, pi, off, sbr, str_, _n: (bi, hi, 0, off[0] + str_[bi, hi, pi], 0)
  bmap = lambda bi, hi, pi, off, sbr, str_, _n: (bi, hi, sbr[bi, hi, pi], 0)
  in_specs = [pl.BlockSpec((None, None, g, bq, d), tmap),
              pl.BlockSpec((None, None, ls, d), bmap),
              pl.BlockSpec((None, None, ls, dv), bmap),
              pl.BlockSpec((None, None, g, bq, dv), tmap),
              pl.BlockSpec((None, None, g, bq, 1), tmap),
              pl.BlockSpec((None, None, g, bq, 1), tmap),
              pl.BlockSpec((None, None, bq, geo.n), lambda bi, hi, pi, off, sbr, str_, _n:
                           (bi, hi, off[0] + str_[bi, hi, pi], 0))]
  in_specs += _seg_specs(segs, geo, lambda bi, hi, pi, off, sbr, str_, _n:
                         off[0] + str_[bi, hi, pi])
  in_specs += [pl.BlockSpec((None, None, ls, d), bmap), pl.BlockSpec((None, None, ls, dv), bmap)]
  n_in = 4 + 7 + len(extra)
  dkv_call = pl.pallas_call(
      functools.partial(_dkv_kernel, g=g, bq=bq, ls=ls, scale=scale, has_seg=has_seg,
                        prec=prec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, hk, npair), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, ls, d), bmap),
                     pl.BlockSpec((None, None, ls, dv), bmap)]),
      out_shape=[jax.ShapeDtypeStruct((b, hk, geo.tk, d), _F32),
                 jax.ShapeDtypeStruct((b, hk, geo.tk, dv), _F32)],
      input_output_aliases={n_in: 0, n_in + 1: 1},
      compiler_params=_dims("parallel", "parallel", "arbitrary"),
      interpret=interpret, name="nsa_selected_dkv_tpu")

  do5 = do5.astype(q5.dtype)
  ins = (q5, k4, v4, do5, lse_b, delta, idx, *extra)

  def body(c, carry):
    dq, dk, dv_ = carry
    off = jnp.reshape(c * ct, (1,)).astype(jnp.int32)
    dq = dq_call(off, _chunk(u5, c, geo), _chunk(c4, c, geo), *ins, dq)
    dk, dv_ = dkv_call(off, _chunk(sb, c, geo), _chunk(st, c, geo), _chunk(nval, c, geo),
                       *ins, dk, dv_)
    return dq, dk, dv_

  init = (jnp.zeros(q5.shape, q5.dtype), jnp.zeros((b, hk, geo.tk, d), _F32),
          jnp.zeros((b, hk, geo.tk, dv), _F32))
  return _loop_chunks(geo, body, init)

