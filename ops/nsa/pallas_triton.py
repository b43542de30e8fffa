"""NSA kernels in Pallas (Triton lowering, GPU): selected-block attention fwd + bwd; the
selection (scores + top-n) lives in ops/nsa/triton_scores.py and is re-exported here for the
registry. The compressed branch and the window branch run on ops.attention.

Selected attention is group-centric: a forward / dq program owns one query position and ALL
query heads of one GQA group (padded to >= 16 rows for the tensor cores) and loops over the
group's selected blocks of select_len keys. dk / dv avoid both a dense T x T tensor and atomics:
the (block, query) pairs of block_idx are sorted by block (stable, so deterministic), cut into
work items of at most `bwd_chunk` queries of one block, and each item program loads its K/V
block once and scans its queries (gathered by index inside the kernel), writing a partial
dK / dV tile; a third kernel adds the partials of each block (its items are contiguous) and
writes dK / dV in the input layout. Splitting keeps blocks chosen by every query (the first and
local ones) from serialising on one program. The partials are summed by a kernel rather than
jax.ops.segment_sum: XLA lowers that to an f32 scatter-add whose atomics collide on the blocks
every query picks (120 of 136 ms of the selected branch's fwd+bwd at 16k on an H200).

With NSABlockConfig.sel_block_q > 1 (sel_dq_block_q / sel_dkv_block_q for the backward's
kernels) the kernels take several queries per step (ops/nsa/selected_tiles_triton.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.nsa import compress
from ops.nsa import selected_tiles_triton as tiles
from ops.nsa.config import NSABlockConfig, default_block_config
from ops.nsa.kernel_common import dot as _dot
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import online_softmax_step as _online
from ops.nsa.kernel_common import pad_axis as _pad_axis
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import prec as _prec
from ops.nsa.kernel_common import triton_compiler as _compiler
from ops.nsa.triton_scores import select_blocks, selection_scores  # noqa: F401 (registered)

_F32 = jnp.float32


# --------------------------------------------------------------------------- selected attention
def _sel_fwd_kernel(idx_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *,
                    scale, ls, bk, n, has_seg, prec):
  t = pl.program_id(0)
  q = q_ref[...]
  gp = q.shape[0]
  dv = v_ref.shape[-1]
  qs = qseg_ref[t] if has_seg else None

  def body(i, carry):
    m, l, acc = carry
    blk = idx_ref[i]
    start = jnp.maximum(blk, 0) * ls
    for c in range(ls // bk):
      off = start + c * bk
      k = k_ref[pl.ds(off, bk), :]
      v = v_ref[pl.ds(off, bk), :]
      s = _dot(q, k, prec, tb=True) * scale
      ok = ((off + _iota(bk)) <= t) & (blk >= 0)
      if has_seg:
        ok = ok & (kseg_ref[pl.ds(off, bk)] == qs)
      s = jnp.where(ok[None, :], s, -jnp.inf)
      m, l, acc = _online(s, v, (m, l, acc), prec)
    return m, l, acc

  init = (jnp.full((gp,), -jnp.inf, _F32), jnp.zeros((gp,), _F32), jnp.zeros((gp, dv), _F32))
  m, l, acc = lax.fori_loop(0, n, body, init)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)


def _sel_dq_kernel(idx_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                   delta_ref, dq_ref, *, scale, ls, bk, n, has_seg, prec):
  t = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  delta = delta_ref[...]
  qs = qseg_ref[t] if has_seg else None

  def body(i, dq):
    blk = idx_ref[i]
    start = jnp.maximum(blk, 0) * ls
    for c in range(ls // bk):
      off = start + c * bk
      k = k_ref[pl.ds(off, bk), :]
      v = v_ref[pl.ds(off, bk), :]
      s = _dot(q, k, prec, tb=True) * scale
      ok = ((off + _iota(bk)) <= t) & (blk >= 0)
      if has_seg:
        ok = ok & (kseg_ref[pl.ds(off, bk)] == qs)
      p = jnp.where(ok[None, :], jnp.exp(s - lse[:, None]), 0.0)
      dp = _dot(do, v, prec, tb=True)
      ds = p * (dp - delta[:, None])
      dq = dq + _dot(ds.astype(k.dtype), k, prec)
    return dq

  dq = lax.fori_loop(0, n, body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _sel_dkv_kernel(item_ref, st_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                    delta_ref, dk_ref, dv_ref, *, scale, ls, has_seg, prec):
  blk = item_ref[0]
  lo = item_ref[1]
  hi = item_ref[2]
  start = jnp.maximum(blk, 0) * ls
  k = k_ref[pl.ds(start, ls), :]
  v = v_ref[pl.ds(start, ls), :]
  kpos = start + _iota(ls)
  kseg = kseg_ref[pl.ds(start, ls)] if has_seg else None

  def body(j, carry):
    dk, dv = carry
    t = st_ref[j]
    q = q_ref[t]
    do = do_ref[t]
    lse = lse_ref[t]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    delta = delta_ref[t]
    s = _dot(q, k, prec, tb=True) * scale
    ok = kpos <= t
    if has_seg:
      ok = ok & (kseg == qseg_ref[t])
    p = jnp.where(ok[None, :], jnp.exp(s - lse[:, None]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, prec, ta=True)
    dp = _dot(do, v, prec, tb=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, prec, ta=True)
    return dk, dv

  dk, dv = lax.fori_loop(lo, hi, body, (jnp.zeros(dk_ref.shape, _F32),
                                        jnp.zeros(dv_ref.shape, _F32)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _layout(q, k, v, block_idx, q_segment_ids, ls):
  """Pads to kernel-legal shapes: q -> [b,t,kvh,gp,dp], k/v -> [b,tp,kvh,*], idx -> [...,np]."""
  b, t, h, d = q.shape
  hk, dv = k.shape[2], v.shape[-1]
  g = h // hk
  gp, dp, dvp = _pow2(g), _pow2(d), _pow2(dv)
  tp = -(-t // ls) * ls
  q5 = _pad_axis(_pad_axis(q.reshape(b, t, hk, g, d), 3, gp), 4, dp)
  kp = _pad_axis(_pad_axis(k, 1, tp), 3, dp)
  vp = _pad_axis(_pad_axis(v, 1, tp), 3, dvp)
  n = block_idx.shape[-1]
  idx = _pad_axis(block_idx.astype(jnp.int32), 3, _pow2(n, 1), -1)
  if q_segment_ids is None:
    qseg = jnp.zeros((b, t), jnp.int32)
    kseg = jnp.zeros((b, tp), jnp.int32)
  else:
    qseg = q_segment_ids.astype(jnp.int32)
    kseg = _pad_axis(qseg, 1, tp, -1)
  return q5, kp, vp, idx, qseg, kseg, (b, t, h, d, hk, dv, g, gp, dp, dvp, tp)


def _sel_forward(q, k, v, block_idx, q_segment_ids, *, ls, scale, cfg, interpret):
  q5, kp, vp, idx, qseg, kseg, dims = _layout(q, k, v, block_idx, q_segment_ids, ls)
  b, t, h, d, hk, dv, g, gp, dp, dvp, tp = dims
  bk = cfg.sel_block_k or ls
  npad = idx.shape[-1]
  if cfg.sel_block_q > 1:
    kern = functools.partial(tiles.fwd_kernel, scale=scale, ls=ls, bk=bk,
                             has_seg=q_segment_ids is not None, prec=_prec(q.dtype))
    o5, lse4 = tiles.tile_call(
        kern, "nsa_selected_fwd_tiles", [q5],
        [jax.ShapeDtypeStruct((b, t, hk, gp, dvp), q.dtype),
         jax.ShapeDtypeStruct((b, t, hk, gp), _F32)],
        qt=cfg.sel_block_q, t=t, kp=kp, vp=vp, idx=idx, qseg=qseg, kseg=kseg, cfg=cfg,
        interpret=interpret)
    return o5, lse4
  kern = functools.partial(_sel_fwd_kernel, scale=scale, ls=ls, bk=bk, n=block_idx.shape[-1],
                           has_seg=q_segment_ids is not None, prec=_prec(q.dtype))
  o5, lse4 = pl.pallas_call(
      kern, grid=(t, hk, b),
      in_specs=[
          pl.BlockSpec((None, None, None, npad), lambda i, j, z: (z, i, j, 0)),
          pl.BlockSpec((None, None, None, gp, dp), lambda i, j, z: (z, i, j, 0, 0)),
          pl.BlockSpec((None, tp, None, dp), lambda i, j, z: (z, 0, j, 0)),
          pl.BlockSpec((None, tp, None, dvp), lambda i, j, z: (z, 0, j, 0)),
          pl.BlockSpec((None, t), lambda i, j, z: (z, 0)),
          pl.BlockSpec((None, tp), lambda i, j, z: (z, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, dvp), lambda i, j, z: (z, i, j, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda i, j, z: (z, i, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, t, hk, gp, dvp), q.dtype),
                 jax.ShapeDtypeStruct((b, t, hk, gp), _F32)],
      interpret=interpret, name="nsa_selected_fwd",
      **_compiler(interpret, cfg.sel_num_warps, cfg.sel_num_stages),
  )(idx, q5, kp, vp, qseg, kseg)
  return o5, lse4


def _work_items(block_idx, n_blocks, chunk):
  """Sorted (block, query) pairs and work items. block_idx [b,t,kvh,n] ->
  sorted queries [b,kvh,P] int32, items [b,kvh,NC,4] = (block or -1, lo, hi, 0), NC, and
  per-block item ranges [b,kvh,n_blocks,2] = (first item, item count) (a block's items are
  contiguous)."""
  b, t, hk, n = block_idx.shape
  p = t * n
  nc = -(-p // chunk) + n_blocks
  key = jnp.where(block_idx >= 0, block_idx, n_blocks).transpose(0, 2, 1, 3).reshape(b, hk, p)
  tq = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, n)).reshape(p)
  tq = jnp.broadcast_to(tq, (b, hk, p))
  skey, st = lax.sort((key, tq), dimension=2, is_stable=True, num_keys=1)

  # The binary searches unrolled: as lax while loops (searchsorted's default) they were 6 loops
  # a layer of 7-17 launches each on the GPU (compiled for an H200: 108 loops in nsa_1b's
  # backward), for searches whose work is a few hundred comparisons.
  search = functools.partial(jnp.searchsorted, method="scan_unrolled")

  def items(sk):
    blocks = jnp.arange(n_blocks, dtype=jnp.int32)
    lo = search(sk, blocks, side="left").astype(jnp.int32)
    hi = search(sk, blocks, side="right").astype(jnp.int32)
    nch = (hi - lo + chunk - 1) // chunk
    cum = jnp.cumsum(nch)
    w = jnp.arange(nc, dtype=jnp.int32)
    s = search(cum, w, side="right").astype(jnp.int32)
    real = s < n_blocks
    sc = jnp.minimum(s, n_blocks - 1)
    local = w - (cum[sc] - nch[sc])
    ilo = lo[sc] + local * chunk
    ihi = jnp.minimum(ilo + chunk, hi[sc])
    it = jnp.stack([jnp.where(real, s, -1), jnp.where(real, ilo, 0),
                    jnp.where(real, ihi, 0), jnp.zeros_like(s)], -1)
    return it, jnp.stack([cum - nch, nch], -1).astype(jnp.int32)

  it, ranges = jax.vmap(jax.vmap(items))(skey)
  return st, it, nc, ranges


def _sum_partials_kernel(range_ref, part_ref, out_ref):
  """out = sum of the partial tiles of one block's work items."""
  first = range_ref[0]
  acc = lax.fori_loop(first, first + range_ref[1], lambda w, acc: acc + part_ref[w],
                      jnp.zeros(out_ref.shape, _F32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _sum_partials(part, ranges, tp, dtype, *, interpret, cfg):
  """part [b,kvh,NC,ls,w] f32 partial tiles, ranges [b,kvh,n_blocks,2] -> [b,tp,kvh,w] dtype."""
  b, hk, nc, ls, w = part.shape
  n_blocks = ranges.shape[2]
  return pl.pallas_call(
      _sum_partials_kernel, grid=(n_blocks, hk, b),
      in_specs=[pl.BlockSpec((None, None, None, 2), lambda i, j, z: (z, j, i, 0)),
                pl.BlockSpec((None, None, nc, ls, w), lambda i, j, z: (z, j, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, ls, None, w), lambda i, j, z: (z, i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, tp, hk, w), dtype),
      interpret=interpret, name="nsa_selected_dkv_sum",
      **_compiler(interpret, cfg.bwd_num_warps, 1),
  )(ranges, part)


def _sel_dq(q5, kp, vp, idx, qseg, kseg, do5, lse4, delta, *, dims, ls, bk, n, scale, has_seg,
            prec, cfg, interpret):
  """dq of the one-query-per-program kernel: -> dq5 [b, t, kvh, gp, dp]."""
  b, t, _, _, hk, _, _, gp, dp, dvp, tp = dims
  npad = idx.shape[-1]
  kern = functools.partial(_sel_dq_kernel, scale=scale, ls=ls, bk=bk, n=n,
                           has_seg=has_seg, prec=prec)
  row = lambda last: pl.BlockSpec((None, None, None, gp) + last,
                                  lambda i, j, z: (z, i, j, 0) + (0,) * len(last))
  return pl.pallas_call(
      kern, grid=(t, hk, b),
      in_specs=[
          pl.BlockSpec((None, None, None, npad), lambda i, j, z: (z, i, j, 0)),
          row((dp,)),
          pl.BlockSpec((None, tp, None, dp), lambda i, j, z: (z, 0, j, 0)),
          pl.BlockSpec((None, tp, None, dvp), lambda i, j, z: (z, 0, j, 0)),
          pl.BlockSpec((None, t), lambda i, j, z: (z, 0)),
          pl.BlockSpec((None, tp), lambda i, j, z: (z, 0)),
          row((dvp,)), row(()), row(()),
      ],
      out_specs=row((dp,)),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      interpret=interpret, name="nsa_selected_dq",
      **_compiler(interpret, cfg.sel_num_warps, cfg.sel_num_stages),
  )(idx, q5, kp, vp, qseg, kseg, do5, lse4, delta)


def _sel_backward(q, k, v, block_idx, q_segment_ids, o5, lse4, do, dlse, *, ls, scale, cfg,
                  interpret):
  q5, kp, vp, idx, qseg, kseg, dims = _layout(q, k, v, block_idx, q_segment_ids, ls)
  b, t, h, d, hk, dv, g, gp, dp, dvp, tp = dims
  bk = cfg.sel_block_k or ls
  has_seg = q_segment_ids is not None
  prec = _prec(q.dtype)
  do5 = _pad_axis(_pad_axis(do.reshape(b, t, hk, g, dv), 3, gp), 4, dvp)
  delta = jnp.sum(o5.astype(_F32) * do5.astype(_F32), -1)
  if dlse is not None:
    dl = _pad_axis(dlse.astype(_F32).reshape(b, hk, g, t).transpose(0, 3, 1, 2), 3, gp)
    delta = delta - jnp.where(jnp.isfinite(lse4), dl, 0.0)
  q_dq, q_dkv = cfg.bwd_block_q()
  if q_dq > 1:
    kern = functools.partial(tiles.dq_kernel, scale=scale, ls=ls, bk=bk, has_seg=has_seg,
                             prec=prec)
    (dq5,) = tiles.tile_call(kern, "nsa_selected_dq_tiles", [q5, do5, lse4, delta],
                             [jax.ShapeDtypeStruct(q5.shape, q.dtype)], qt=q_dq,
                             t=t, kp=kp, vp=vp, idx=idx, qseg=qseg, kseg=kseg, cfg=cfg,
                             interpret=interpret)
  else:
    dq5 = _sel_dq(q5, kp, vp, idx, qseg, kseg, do5, lse4, delta, dims=dims, ls=ls, bk=bk,
                  n=block_idx.shape[-1], scale=scale, has_seg=has_seg, prec=prec, cfg=cfg,
                  interpret=interpret)
  dq = dq5[:, :, :, :g, :d].reshape(b, t, h, d)

  n_blocks = tp // ls
  st, items, nc, ranges = _work_items(block_idx, n_blocks, cfg.bwd_chunk)
  qt = q_dkv
  if qt > 1:     # the last step of an item reads up to qt - 1 entries past the list (masked)
    st = _pad_axis(st, 2, st.shape[-1] + qt)
    kern = functools.partial(tiles.dkv_kernel, scale=scale, ls=ls, qt=qt, has_seg=has_seg,
                             prec=prec)
  else:
    kern = functools.partial(_sel_dkv_kernel, scale=scale, ls=ls, has_seg=has_seg, prec=prec)
  p = st.shape[-1]
  full = lambda shape: pl.BlockSpec((None,) + shape, lambda i, j, z: (z,) + (0,) * len(shape))
  seq = lambda last: pl.BlockSpec((None, t, None, gp) + last,
                                  lambda i, j, z: (z, 0, j, 0) + (0,) * len(last))
  dk_part, dv_part = pl.pallas_call(
      kern, grid=(nc, hk, b),
      in_specs=[
          pl.BlockSpec((None, None, None, 4), lambda i, j, z: (z, j, i, 0)),
          pl.BlockSpec((None, None, p), lambda i, j, z: (z, j, 0)),
          seq((dp,)),
          pl.BlockSpec((None, tp, None, dp), lambda i, j, z: (z, 0, j, 0)),
          pl.BlockSpec((None, tp, None, dvp), lambda i, j, z: (z, 0, j, 0)),
          full((t,)), full((tp,)),
          seq((dvp,)), seq(()), seq(()),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, ls, dp), lambda i, j, z: (z, j, i, 0, 0)),
          pl.BlockSpec((None, None, None, ls, dvp), lambda i, j, z: (z, j, i, 0, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, hk, nc, ls, dp), _F32),
                 jax.ShapeDtypeStruct((b, hk, nc, ls, dvp), _F32)],
      interpret=interpret, name="nsa_selected_dkv_tiles" if qt > 1 else "nsa_selected_dkv",
      **_compiler(interpret, cfg.bwd_num_warps, cfg.bwd_num_stages),
  )(items, st, q5, kp, vp, qseg, kseg, do5, lse4, delta)
  sums = functools.partial(_sum_partials, ranges=ranges, tp=tp, interpret=interpret, cfg=cfg)
  dk = sums(dk_part, dtype=k.dtype)[:, :t, :, :d]
  dvv = sums(dv_part, dtype=v.dtype)[:, :t, :, :dv]
  return dq, dk, dvv


def _unlayout(o5, lse4, b, t, h, g, dv):
  o = o5[:, :, :, :g, :dv].reshape(b, t, h, dv)
  lse = lse4[:, :, :, :g].transpose(0, 2, 3, 1).reshape(b, h, t)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _selected(q, k, v, block_idx, q_segment_ids, ls, scale, cfg, interpret):
  o5, lse4 = _sel_forward(q, k, v, block_idx, q_segment_ids, ls=ls, scale=scale, cfg=cfg,
                          interpret=interpret)
  b, t, h, _ = q.shape
  return _unlayout(o5, lse4, b, t, h, h // k.shape[2], v.shape[-1])


def _selected_fwd(q, k, v, block_idx, q_segment_ids, ls, scale, cfg, interpret):
  o5, lse4 = _sel_forward(q, k, v, block_idx, q_segment_ids, ls=ls, scale=scale, cfg=cfg,
                          interpret=interpret)
  b, t, h, _ = q.shape
  out = _unlayout(o5, lse4, b, t, h, h // k.shape[2], v.shape[-1])
  return out, (q, k, v, block_idx, q_segment_ids, o5, lse4)


def _selected_bwd(ls, scale, cfg, interpret, res, cts):
  q, k, v, block_idx, q_segment_ids, o5, lse4 = res
  do, dlse = cts
  dq, dk, dv = _sel_backward(q, k, v, block_idx, q_segment_ids, o5, lse4, do, dlse, ls=ls,
                             scale=scale, cfg=cfg, interpret=interpret)
  zero_idx = np.zeros(block_idx.shape, jax.dtypes.float0)
  zero_seg = None if q_segment_ids is None else np.zeros(q_segment_ids.shape, jax.dtypes.float0)
  return dq, dk, dv, zero_idx, zero_seg


_selected.defvjp(_selected_fwd, _selected_bwd)


def _check_select_len(ls, bk):
  if ls < 16 or ls & (ls - 1):
    raise UnsupportedError(f"select_len {ls} must be a power of two >= 16 for Triton tiles")
  if ls % bk or bk < 16 or bk & (bk - 1):
    raise UnsupportedError(f"sel_block_k {bk} must be a power of two >= 16 dividing {ls}")


def selected_attention(q, k_slc, v_slc, block_idx, *, select_len, q_segment_ids=None,
                       scale=None, interpret=None, config=None):
  interpret = resolve_interpret(interpret, GPU)
  cfg = config or (NSABlockConfig() if interpret else default_block_config())
  _check_select_len(select_len, cfg.sel_block_k or select_len)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  return _selected(q, k_slc, v_slc, block_idx.astype(jnp.int32), q_segment_ids, select_len,
                   scale, cfg, interpret)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, q_segment_ids=None, scale=None,
                         interpret=None, config=None):
  del config
  resolve_interpret(interpret, GPU)
  return compress.compressed_attention_flash(q, k_cmp, v_cmp, block_len=block_len,
                                             stride=stride, q_segment_ids=q_segment_ids,
                                             scale=scale, interpret=interpret)
