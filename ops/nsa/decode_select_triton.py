"""NSA decode's block selection on GPU (Pallas, Triton lowering), the second kernel group of
ops/nsa/decode_triton.py: from the compressed branch's logits and split partial lse, each
(batch row, kv head) gets its selection-block scores (p = exp(s - lse) summed over the GQA
group's heads, mapped from compression blocks onto selection blocks as taps) and its top-n
blocks (the training path's candidates, forced blocks and tie rule). Two kernels, or one with
NSABlockConfig.decode_fuse_topn. Also the logit buffer geometry the compressed kernel writes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops.nsa.config import NSAConfig
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import triton_compiler as _compiler
from ops.nsa.topn_triton import candidate_scores, top_n_sorted

_F32 = jnp.float32


def n_valid(len_ref, cfg: NSAConfig, n_cmp: int):
  """Complete compressed entries of this row (ops.nsa.decode.n_valid_cmp, as a scalar)."""
  # floor((len - l) / d) + 1 = floor((len - l + d) / d); clamped at 0 first because lax.div
  # truncates toward zero
  above = jnp.maximum(len_ref[()] - cfg.block_len + cfg.stride, 0)
  return jnp.minimum(lax.div(above, jnp.int32(cfg.stride)), n_cmp)


def _map_taps(cfg: NSAConfig):
  """Compression -> selection mapping as taps: p_slc[j] = sum over (delta, weight) of
  weight * p_cmp[j*per + delta] (the overlap weights of ops.nsa.compress.slc_from_cmp: entry c
  feeds sub-blocks c .. c+r-1, each with weight stride/block_len)."""
  r, per = cfg.block_len // cfg.stride, cfg.select_len // cfg.stride
  w = cfg.stride / cfg.block_len
  taps = []
  for delta in range(-(r - 1), per):
    cnt = sum(1 for n in range(r) if 0 <= delta + n < per)
    taps.append((delta, cnt * w))
  return taps


def layout(cfg: NSAConfig, n: int, max_len: int):
  """Logit buffer geometry: (rows R (pow2 >= n_slc), front rows F, total width). The
  compressed branch writes logit j at column F*per + j of a [gp, width] row; the selection
  kernel reads it as [gp, width/per, per] so selection block j's taps are strided loads."""
  per = cfg.select_len // cfg.stride
  r = cfg.block_len // cfg.stride
  n_slc = cfg.n_slc(max_len)
  rows = _pow2(n_slc, 1)
  front = -(-(r - 1) // per)
  width = front * per + max(rows * per, -(-n // per) * per)
  return rows, front, width


def _merged_lse(lse, valid):
  """Logsumexp over axis 0 of the valid rows of lse [S, gp] -> [gp] (-inf where none is)."""
  lse = jnp.where(valid, lse, -jnp.inf)
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  tot = jnp.sum(jnp.exp(lse - m_safe[None, :]), axis=0)
  return jnp.where(tot > 0, m_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)


def _block_scores(len_ref, lse_ref, s_ref, c, rc, *, cfg: NSAConfig, g, splits, n_cmp, front,
                  taps):
  """Selection-block scores [rc] of rows [c*rc, (c+1)*rc) of one (batch row, kv head): the
  final lse of each head from the split partials, p = exp(s - lse) summed over the group's
  heads and mapped onto selection blocks by the taps. A tap delta of block j reads logit
  j*per + delta, i.e. row j + delta // per, column delta % per of the [gp, rows, per] view, so
  each row shift is one [gp, rc, per] tile load."""
  nv = n_valid(len_ref, cfg, n_cmp)
  gp, per = s_ref.shape[0], s_ref.shape[2]
  lse = lse_ref[...]
  lse = _merged_lse(lse, lax.broadcasted_iota(jnp.int32, lse.shape, 0) < splits)
  shape = (gp, rc, per)
  head = lax.broadcasted_iota(jnp.int32, shape, 0)
  row = c * rc + lax.broadcasted_iota(jnp.int32, shape, 1)
  col = lax.broadcasted_iota(jnp.int32, (rc, per), 1)
  acc = jnp.zeros((rc,), _F32)
  for shift in sorted({delta // per for delta, _ in taps}):
    x = s_ref[:, pl.ds(front + shift + c * rc, rc), :]
    e = (row + shift) * per + lax.broadcasted_iota(jnp.int32, shape, 2)
    ok = (head < g) & (e >= 0) & (e < nv)
    p = jnp.sum(jnp.where(ok, jnp.exp(x - lse[:, None, None]), 0.0), axis=0)   # [rc, per]
    wt = jnp.zeros((rc, per), _F32)
    for delta, w in taps:
      if delta // per == shift:
        wt = jnp.where(col == delta % per, w, wt)
    acc = acc + jnp.sum(p * wt, axis=1)
  return acc


def _scores_kernel(len_ref, lse_ref, s_ref, p_ref, **kw):
  p_ref[...] = _block_scores(len_ref, lse_ref, s_ref, pl.program_id(0), p_ref.shape[0], **kw)


def _top_n(len_ref, p, idx_ref, cfg: NSAConfig, n_slc):
  """Top-n of one (batch row, kv head)'s scores p [rows] into idx_ref with the training path's
  helpers (candidates, forced blocks and tie rule of select_from_scores)."""
  j = _iota(p.shape[0])
  cur = lax.div(len_ref[()] - 1, jnp.int32(cfg.select_len))
  score = candidate_scores(p, j, cur, 0, n_slc, cfg)
  idx_ref[...] = top_n_sorted(score, j, cfg.n_select, idx_ref.shape[0])


def _topn_kernel(len_ref, p_ref, idx_ref, *, cfg: NSAConfig, n_slc):
  _top_n(len_ref, p_ref[...], idx_ref, cfg, n_slc)


def _scores_topn_kernel(len_ref, lse_ref, s_ref, idx_ref, *, cfg: NSAConfig, n_slc, rows, g,
                        splits, n_cmp, front, taps):
  """decode_fuse_topn: one program per (batch row, kv head) scores all its selection blocks
  (the same sums as _block_scores) and picks the top n, so the scores never leave the program
  (one launch fewer a step). The group's heads are summed in a loop: a [heads, rows, per] tile
  of all blocks at once would not fit in registers at long caches (65536 floats at 64k)."""
  nv = n_valid(len_ref, cfg, n_cmp)
  per = s_ref.shape[2]
  lse = lse_ref[...]
  lse = _merged_lse(lse, lax.broadcasted_iota(jnp.int32, lse.shape, 0) < splits)   # [gp]
  head = _iota(lse.shape[0])
  row = lax.broadcasted_iota(jnp.int32, (rows, per), 0)
  col = lax.broadcasted_iota(jnp.int32, (rows, per), 1)
  acc = jnp.zeros((rows,), _F32)
  for shift in sorted({delta // per for delta, _ in taps}):
    e = (row + shift) * per + col
    ok = (e >= 0) & (e < nv)

    def add_head(h, p, shift=shift, ok=ok):
      x = s_ref[h, pl.ds(front + shift, rows), :]
      lse_h = jnp.sum(jnp.where(head == h, lse, 0.0))
      return p + jnp.where(ok, jnp.exp(x - lse_h), 0.0)

    p = lax.fori_loop(0, g, add_head, jnp.zeros((rows, per), _F32))
    wt = jnp.zeros((rows, per), _F32)
    for delta, w in taps:
      if delta // per == shift:
        wt = jnp.where(col == delta % per, w, wt)
    acc = acc + jnp.sum(p * wt, axis=1)
  _top_n(len_ref, acc, idx_ref, cfg, n_slc)


def select_blocks(lse_c, s, lengths, splits, *, g, cfg: NSAConfig, n_cmp, max_len, bc, interpret):
  """-> block_idx [b, kvh, pow2(n_select)] int32 (ascending, -1 padding; the first n_select
  columns are the selection)."""
  sp, b, hk, gp = lse_c.shape
  rows, front, _ = layout(cfg, 0, max_len)
  width = s.shape[-1]
  per = cfg.select_len // cfg.stride
  s5 = s.reshape(b, hk, gp, width // per, per)
  score_kw = dict(cfg=cfg, g=g, splits=splits, n_cmp=n_cmp, front=front, taps=_map_taps(cfg))
  n_pad = _pow2(cfg.n_select, 1)
  if bc.decode_fuse_topn:
    kern = functools.partial(_scores_topn_kernel, n_slc=cfg.n_slc(max_len), rows=rows,
                             **score_kw)
    return pl.pallas_call(
        kern, grid=(b, hk),
        in_specs=[pl.BlockSpec((None,), lambda i, j: (i,)),
                  pl.BlockSpec((sp, None, None, gp), lambda i, j: (0, i, j, 0)),
                  pl.BlockSpec((None, None, gp, width // per, per),
                               lambda i, j: (i, j, 0, 0, 0))],
        out_specs=pl.BlockSpec((None, None, n_pad), lambda i, j: (i, j, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hk, n_pad), jnp.int32),
        interpret=interpret, name="nsa_decode_scores_topn",
        **_compiler(interpret, bc.decode_topn_num_warps, 1),
    )(lengths, lse_c, s5)
  rc = min(rows, bc.decode_select_block)
  kern = functools.partial(_scores_kernel, **score_kw)
  p = pl.pallas_call(
      kern, grid=(rows // rc, b, hk),
      in_specs=[pl.BlockSpec((None,), lambda c, i, j: (i,)),
                pl.BlockSpec((sp, None, None, gp), lambda c, i, j: (0, i, j, 0)),
                pl.BlockSpec((None, None, gp, width // per, per),
                             lambda c, i, j: (i, j, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, None, rc), lambda c, i, j: (i, j, c)),
      out_shape=jax.ShapeDtypeStruct((b, hk, rows), _F32),
      interpret=interpret, name="nsa_decode_scores",
      **_compiler(interpret, bc.decode_select_num_warps, 1),
  )(lengths, lse_c, s5)
  kern = functools.partial(_topn_kernel, cfg=cfg, n_slc=cfg.n_slc(max_len))
  return pl.pallas_call(
      kern, grid=(b, hk),
      in_specs=[pl.BlockSpec((None,), lambda i, j: (i,)),
                pl.BlockSpec((None, None, rows), lambda i, j: (i, j, 0))],
      out_specs=pl.BlockSpec((None, None, n_pad), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hk, n_pad), jnp.int32),
      interpret=interpret, name="nsa_decode_topn",
      **_compiler(interpret, bc.decode_topn_num_warps, 1),
  )(lengths, p)
