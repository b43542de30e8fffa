"""NSA kernels for TPUs in Pallas (Mosaic lowering): selected-block attention fwd, dq, dk/dv.

The compressed branch runs on ops.attention's TPU flash kernels (`compressed_attention` below:
compress.compressed_attention_flash packs the d queries that share a visible prefix of
compressed keys into the head axis, which turns block-granular causality into plain causal
attention, with lse). Selection scores have their own kernel (`selection_scores`: group-summed
compressed-attention probabilities mapped onto selection blocks, no [t, n_cmp] tensor); the
top-n pick itself stays XLA (lax.top_k in ops.nsa.select, shared by every implementation).

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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops._backend import TPU, UnsupportedError, resolve_interpret
from ops.nsa import compress
from ops.nsa.config import NSABlockConfig, default_block_config
from ops.nsa.select import select_from_scores

_F32 = jnp.float32
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _dims(*sem):
  return _CompilerParams(dimension_semantics=sem)


def _prec(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _nt(a, b, prec):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)


def _nn(a, b, prec):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)


def _pad_axis(x, axis, size, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


# ----------------------------------------------------------------------------- layout
class _Geom:
  """Static geometry of one selected-attention call."""

  def __init__(self, q, k, v, block_idx, ls, bq, budget):
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    n = block_idx.shape[-1]
    self.b, self.t, self.h, self.d, self.hk, self.dv, self.n = b, t, h, d, hk, dv, n
    self.g = h // hk
    self.ls, self.bq = ls, bq
    self.nblk = -(-t // ls)
    self.tk = self.nblk * ls
    self.u = max(1, min(bq * n, self.nblk))        # union slots per query tile
    nt = -(-t // bq)
    self.ct = max(1, min(nt, budget // max(1, b * hk * self.u)))   # tiles per call
    self.nch = -(-nt // self.ct)
    self.nt = self.nch * self.ct
    self.tq = self.nt * bq


def _layout(q, k, v, block_idx, qseg, geo: _Geom):
  """q -> [b,hk,g,tq,d]; k/v -> [b,hk,tk,*]; idx -> [b,hk,tq,n]; segments (or None)."""
  b, t, hk, g = geo.b, geo.t, geo.hk, geo.g
  q5 = _pad_axis(q.reshape(b, t, hk, g, geo.d).transpose(0, 2, 3, 1, 4), 3, geo.tq)
  k4 = _pad_axis(k.transpose(0, 2, 1, 3), 2, geo.tk)
  v4 = _pad_axis(v.transpose(0, 2, 1, 3), 2, geo.tk)
  idx = _pad_axis(block_idx.astype(jnp.int32).transpose(0, 2, 1, 3), 2, geo.tq, -1)
  segs = None
  if qseg is not None:
    qs = _pad_axis(qseg.astype(jnp.int32), 1, geo.tq, -1)[:, :, None]
    ks = _pad_axis(qseg.astype(jnp.int32), 1, geo.tk, -2).reshape(b, geo.nblk, geo.ls)
    segs = (qs, ks)
  return q5, k4, v4, idx, segs


def _unions(idx, geo: _Geom):
  """Per query tile: sorted unique selected blocks [b,hk,nt,U] (tail repeats the last) and
  their count [b,hk,nt]."""
  b, hk = geo.b, geo.hk
  ids = jnp.sort(idx.reshape(b, hk, geo.nt, geo.bq * geo.n), axis=-1)
  prev = jnp.concatenate([jnp.full(ids.shape[:-1] + (1,), -1, jnp.int32), ids[..., :-1]], -1)
  new = (ids >= 0) & (ids != prev)
  big = jnp.iinfo(jnp.int32).max
  u = jnp.sort(jnp.where(new, ids, big), axis=-1)[..., :geo.u]
  cnt = jnp.sum(new, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(u, jnp.maximum(cnt - 1, 0)[..., None], -1)
  last = jnp.where(cnt[..., None] > 0, last, 0)
  u = jnp.where(jnp.arange(geo.u, dtype=jnp.int32) < cnt[..., None], u, last)
  return u.astype(jnp.int32), cnt


def _pairs(u, cnt, geo: _Geom):
  """(block, tile) pairs of each chunk's unions sorted by block: blocks / local tiles
  [b,hk,nch,ct*U] (invalid tail repeats the last valid pair) and the valid count [b,hk,nch]."""
  b, hk, nch, ct, nu = geo.b, geo.hk, geo.nch, geo.ct, geo.u
  valid = jnp.arange(nu, dtype=jnp.int32) < cnt[..., None]              # [b,hk,nt,U]
  key = jnp.where(valid, u, geo.nblk).reshape(b, hk, nch, ct * nu)
  tile = jnp.broadcast_to(jnp.arange(ct, dtype=jnp.int32)[:, None], (ct, nu)).reshape(ct * nu)
  tile = jnp.broadcast_to(tile, key.shape)
  sk, st = lax.sort((key, tile), dimension=3, is_stable=True, num_keys=1)
  nval = jnp.sum(valid.reshape(b, hk, nch, ct * nu), -1).astype(jnp.int32)
  j = jnp.arange(ct * nu, dtype=jnp.int32)
  lastk = jnp.take_along_axis(sk, jnp.maximum(nval - 1, 0)[..., None], -1)
  lastt = jnp.take_along_axis(st, jnp.maximum(nval - 1, 0)[..., None], -1)
  ok = j < nval[..., None]
  sk = jnp.where(ok, sk, jnp.where(nval[..., None] > 0, lastk, 0))
  st = jnp.where(ok, st, jnp.where(nval[..., None] > 0, lastt, 0))
  return sk.astype(jnp.int32), st.astype(jnp.int32), nval


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


# ----------------------------------------------------------------------------- custom_vjp
def _forward(q, k, v, block_idx, qseg, ls, scale, bq, budget, interpret):
  geo = _Geom(q, k, v, block_idx, ls, bq, budget)
  q5, k4, v4, idx, segs = _layout(q, k, v, block_idx, qseg, geo)
  u, cnt = _unions(idx, geo)
  o5, lse5 = _fwd(q5, k4, v4, idx, segs, u, cnt, geo, scale=scale, interpret=interpret)
  b, t, h = geo.b, geo.t, geo.h
  o = o5[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, geo.dv)
  lse = lse5[:, :, :, :t, 0].reshape(b, h, t)
  return (o, lse), (o5, lse5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _selected(q, k, v, block_idx, qseg, ls, scale, bq, budget, interpret):
  return _forward(q, k, v, block_idx, qseg, ls, scale, bq, budget, interpret)[0]


def _selected_fwd(q, k, v, block_idx, qseg, ls, scale, bq, budget, interpret):
  out, (o5, lse5) = _forward(q, k, v, block_idx, qseg, ls, scale, bq, budget, interpret)
  return out, (q, k, v, block_idx, qseg, o5, lse5)


def _selected_bwd(ls, scale, bq, budget, interpret, res, cts):
  q, k, v, block_idx, qseg, o5, lse5 = res
  do, dlse = cts
  geo = _Geom(q, k, v, block_idx, ls, bq, budget)
  q5, k4, v4, idx, segs = _layout(q, k, v, block_idx, qseg, geo)
  u, cnt = _unions(idx, geo)
  b, t, hk, g = geo.b, geo.t, geo.hk, geo.g
  do5 = _pad_axis(do.reshape(b, t, hk, g, geo.dv).transpose(0, 2, 3, 1, 4), 3, geo.tq)
  dlse5 = None
  if dlse is not None:
    dlse5 = _pad_axis(dlse.astype(_F32).reshape(b, hk, g, t), 3, geo.tq)[..., None]
  dq5, dk4, dv4 = _bwd(q5, k4, v4, idx, segs, u, cnt, o5, lse5, do5, dlse5, geo, scale=scale,
                       interpret=interpret)
  dq = dq5[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(q.shape)
  dk = dk4[:, :, :t].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv4[:, :, :t].transpose(0, 2, 1, 3).astype(v.dtype)
  zero_idx = np.zeros(block_idx.shape, jax.dtypes.float0)
  zero_seg = None if qseg is None else np.zeros(qseg.shape, jax.dtypes.float0)
  return dq, dk, dv, zero_idx, zero_seg


_selected.defvjp(_selected_fwd, _selected_bwd)


def _check(q, k, v, ls, bq):
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise UnsupportedError(f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}")
  if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  sub = 16 if q.dtype == jnp.bfloat16 else 8
  if ls % 8:
    raise UnsupportedError(f"select_len {ls} is not a multiple of 8 (TPU sublane tile)")
  if bq % sub:
    raise UnsupportedError(f"tpu_block_q {bq} is not a multiple of {sub} for {q.dtype}")


def selected_attention(q, k_slc, v_slc, block_idx, *, select_len, q_segment_ids=None,
                       scale=None, interpret=None, config=None):
  """The "pallas_tpu" implementation of ops.nsa.selected_attention; returns (o, lse)."""
  interpret = resolve_interpret(interpret, TPU)
  cfg = config or (NSABlockConfig() if interpret else default_block_config())
  if not isinstance(cfg, NSABlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an NSABlockConfig")
  bq = cfg.tpu_block_q
  _check(q, k_slc, v_slc, select_len, bq)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  return _selected(q, k_slc, v_slc, block_idx.astype(jnp.int32), q_segment_ids, select_len,
                   scale, bq, cfg.tpu_prefetch_max, interpret)


# ------------------------------------------------------------------------- selection scores
def _overlap(n_cmp, n_slc, block_len, stride, select_len):
  """compress.overlap_matrix built on device (no [n_cmp, n_slc] constant in the program)."""
  j0 = lax.broadcasted_iota(jnp.int32, (n_cmp, n_slc), 0) * stride
  s0 = lax.broadcasted_iota(jnp.int32, (n_cmp, n_slc), 1) * select_len
  ov = jnp.minimum(j0 + block_len, s0 + select_len) - jnp.maximum(j0, s0)
  return jnp.maximum(ov, 0).astype(_F32) / block_len


def _score_kernel(q_ref, lse_ref, k_ref, w_ref, *refs, g, bq, bk, l, st, n_cmp, scale,
                  has_seg, prec):
  if has_seg:
    qseg_ref, cseg_ref, out_ref = refs
  else:
    (out_ref,) = refs
  ti, j = pl.program_id(2), pl.program_id(3)
  r = g * bq

  @pl.when(j == 0)
  def _init():
    out_ref[...] = jnp.zeros(out_ref.shape, _F32)

  # Tiles whose first compressed block ends after the tile's last query add nothing.
  @pl.when(j * bk * st + l - 1 <= ti * bq + bq - 1)
  def _step():
    q = q_ref[...].reshape(r, q_ref.shape[-1])
    s = _nt(q, k_ref[...], prec) * scale                                   # (r, bk)
    qpos = ti * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    jpos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    vis = (jpos * st + (l - 1) <= qpos) & (jpos < n_cmp)
    if has_seg:
      vis = vis & (qseg_ref[...] == cseg_ref[...])
    p = jnp.exp(s - lse_ref[...].reshape(r, 1)).reshape(g, bq, bk)
    pg = jnp.sum(jnp.where(vis[None], p, 0.0), axis=0)                    # group sum (bq, bk)
    out_ref[...] += _nn(pg, w_ref[...], lax.Precision.HIGHEST)


def selection_scores(q, k_cmp, lse_cmp, *, cfg, q_segment_ids=None, interpret=None,
                     config=None):
  """Group-summed selection scores [b, kvh, t, n_slc] f32 (Mosaic kernel, no [t, n_cmp]).

  Grid (batch, kv head, query tile, compressed-key tile); a program forms p_cmp for all heads
  of the group on one tile, sums the group and maps compressed onto selection blocks with the
  tile's rows of the overlap matrix (compress.overlap_matrix), accumulating into the resident
  [tile, n_slc] output block. Future key tiles are skipped (their index map is clamped so
  nothing new is fetched either).
  """
  interpret = resolve_interpret(interpret, TPU)
  bcfg = config or (NSABlockConfig() if interpret else default_block_config())
  if not isinstance(bcfg, NSABlockConfig):
    raise UnsupportedError(f"config {type(bcfg).__name__} is not an NSABlockConfig")
  q, k_cmp, lse_cmp = lax.stop_gradient((q, k_cmp, lse_cmp))
  b, t, h, d = q.shape
  n_cmp, hk = k_cmp.shape[1], k_cmp.shape[2]
  if q.dtype != k_cmp.dtype or not any(q.dtype == x for x in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtypes {q.dtype}/{k_cmp.dtype}")
  g = h // hk
  l, st, ls = cfg.block_len, cfg.stride, cfg.select_len
  bq = bcfg.tpu_block_q
  bk = bcfg.tpu_score_block_k
  if bq % (16 if q.dtype == jnp.bfloat16 else 8):
    raise UnsupportedError(f"tpu_block_q {bq} does not fill the sublanes for {q.dtype}")
  if bk % 128:
    raise UnsupportedError(f"tpu_score_block_k {bk} is not a multiple of 128 lanes")
  n_slc = cfg.n_slc(t)
  if n_cmp == 0:
    return jnp.zeros((b, hk, t, n_slc), _F32)
  scale = float(d ** -0.5 if cfg.scale is None else cfg.scale)
  nsp = -(-n_slc // 128) * 128
  nt = -(-t // bq)
  tq = nt * bq
  nk = -(-n_cmp // bk)
  ncp = nk * bk
  q5 = _pad_axis(q.reshape(b, t, hk, g, d).transpose(0, 2, 3, 1, 4), 3, tq)
  lse = lse_cmp.astype(_F32).reshape(b, hk, g, t)
  lse = _pad_axis(jnp.where(jnp.isfinite(lse), lse, jnp.inf), 3, tq, jnp.inf)[..., None]
  kc = _pad_axis(k_cmp.transpose(0, 2, 1, 3), 2, ncp)
  w = _overlap(ncp, nsp, l, st, ls)
  has_seg = q_segment_ids is not None

  def last_tile(ti):   # the last key tile with a block visible to the query tile
    return jnp.clip(((ti + 1) * bq - 1 - (l - 1)) // st // bk, 0, nk - 1)

  kj = lambda bi, hi, ti, j: jnp.minimum(j, last_tile(ti))
  in_specs = [pl.BlockSpec((None, None, g, bq, d), lambda bi, hi, ti, j: (bi, hi, 0, ti, 0)),
              pl.BlockSpec((None, None, g, bq, 1), lambda bi, hi, ti, j: (bi, hi, 0, ti, 0)),
              pl.BlockSpec((None, None, bk, d), lambda bi, hi, ti, j: (bi, hi, kj(bi, hi, ti, j),
                                                                       0)),
              pl.BlockSpec((bk, nsp), lambda bi, hi, ti, j: (kj(bi, hi, ti, j), 0))]
  extra = []
  if has_seg:
    qs = _pad_axis(q_segment_ids.astype(jnp.int32), 1, tq, -1)[:, :, None]
    cs = _pad_axis(compress.block_segments(q_segment_ids, n_cmp, l, st), 1, ncp, -2)[:, None]
    in_specs += [pl.BlockSpec((None, bq, 1), lambda bi, hi, ti, j: (bi, ti, 0)),
                 pl.BlockSpec((None, 1, bk), lambda bi, hi, ti, j: (bi, 0, kj(bi, hi, ti, j)))]
    extra = [qs, cs]
  out = pl.pallas_call(
      functools.partial(_score_kernel, g=g, bq=bq, bk=bk, l=l, st=st, n_cmp=n_cmp, scale=scale,
                        has_seg=has_seg, prec=_prec(q.dtype)),
      grid=(b, hk, nt, nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, bq, nsp), lambda bi, hi, ti, j: (bi, hi, ti, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hk, tq, nsp), _F32),
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="nsa_selection_scores_tpu",
  )(q5, lse, kc, w, *extra)
  return out[:, :, :t, :n_slc]


def select_blocks(q, k_cmp, lse_cmp, *, cfg, q_segment_ids=None, interpret=None, config=None):
  """The "pallas_tpu" select_blocks: Mosaic score kernel, then top-n in XLA (lax.top_k in
  ops.nsa.select.select_from_scores, shared with every implementation)."""
  p = selection_scores(q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=q_segment_ids,
                       interpret=interpret, config=config)
  seg_start = None if q_segment_ids is None else compress.segment_starts(q_segment_ids)
  return select_from_scores(p, jnp.arange(q.shape[1], dtype=jnp.int32), cfg, seg_start)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, q_segment_ids=None, scale=None,
                         interpret=None, config=None):
  """The "pallas_tpu" compressed branch: ops.attention's TPU flash kernels (with lse)."""
  del config
  interpret = resolve_interpret(interpret, TPU)
  return compress.compressed_attention_flash(q, k_cmp, v_cmp, block_len=block_len,
                                             stride=stride, q_segment_ids=q_segment_ids,
                                             scale=scale, implementation="pallas_tpu",
                                             interpret=interpret)
