"""NSA selection in Pallas (Triton lowering, GPU): the group-summed selection-score kernels
and `select_blocks` (scores, then the top-n kernel of ops/nsa/topn_triton.py).

Scores p_slc[t, s] = sum over the GQA group's heads and the compression blocks j overlapping
selection block s of overlap(j, s) * exp(q_t . k_cmp_j * scale - lse_t), for visible j only. Two
kernels: rows = (query, head) pairs with the group sum as a reduction over heads (the H100/H200
default), or rows = queries with a static loop over the group's heads
(NSABlockConfig.score_head_loop). No [t, n_cmp] tensor is materialised; each program walks the
compressed keys its last query sees.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.nsa import compress, topn_triton
from ops.nsa.config import NSABlockConfig, NSAConfig, default_block_config
from ops.nsa.kernel_common import dot as _dot
from ops.nsa.kernel_common import dot_f32_bf16_exact as _dot_bf16_exact
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import pad_axis as _pad_axis
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import prec as _prec
from ops.nsa.kernel_common import triton_compiler as _compiler
from ops.nsa.select import select_from_scores

_F32 = jnp.float32
_SCORE_Q_SMEM = 128 * 1024    # bytes of q tiles the head-loop score kernel may hold
# (query, head) rows of one row-kernel program: its [rows, bk] f32 probabilities and the
# [bt, rows] group-sum matrix must fit Hopper's 227 KiB of shared memory (512 rows asked 236 KiB)
_SCORE_ROWS = 256


def _write_scores(out_ref, mm_ref, ms_ref, tile_probs, *, i0, bt, bk, bs, l, d, n_cmp,
                  n_out_tiles):
  """Shared loop of both score kernels: for each tile of bk compressed keys visible to the
  program's last query, tile_probs(j0) -> group-summed, masked probabilities [bt, bk]; mapped
  onto selection blocks by the overlap matrices (mm: this tile's bs blocks, ms: the spill into
  the next tile's, carried) and stored; the remaining tiles of the output row are zeroed."""
  mm = mm_ref[...]
  ms = ms_ref[...]
  n_vis = jnp.clip((i0 + bt - 1 - (l - 1)) // d + 1, 0, n_cmp)
  n_tiles = (n_vis + bk - 1) // bk
  if mm.dtype == jnp.bfloat16:       # overlap weights exact in bf16: three tensor-core dots
    wdot = _dot_bf16_exact
  else:
    wdot = lambda a, w: _dot(a, w, lax.Precision.HIGHEST)

  def body(j, carry):
    pg = tile_probs(j * bk)
    out_ref[:, pl.ds(j * bs, bs)] = wdot(pg, mm) + carry
    return wdot(pg, ms)

  carry = lax.fori_loop(0, n_tiles, body, jnp.zeros((bt, bs), _F32))
  out_ref[:, pl.ds(n_tiles * bs, bs)] = carry

  def zero(j, c):
    out_ref[:, pl.ds(j * bs, bs)] = jnp.zeros((bt, bs), _F32)
    return c

  lax.fori_loop(n_tiles + 1, n_out_tiles, zero, 0)


def _visible(j0, rows_t, cseg_ref, qs, *, bk, l, d, n_cmp):
  """[rows, bk] mask: compressed block j0+i has ended by the row's query (and is in its
  segment when qs is given)."""
  jpos = j0 + _iota(bk)
  vis = ((jpos * d + (l - 1))[None, :] <= rows_t[:, None]) & (jpos < n_cmp)[None, :]
  if qs is not None:
    vis = vis & (cseg_ref[pl.ds(j0, bk)][None, :] == qs[:, None])
  return vis


def _score_kernel(q_ref, lse_ref, k_ref, qseg_ref, cseg_ref, mm_ref, ms_ref, out_ref, *, scale,
                  bt, gp, bk, bs, l, d, n_cmp, n_out_tiles, has_seg, prec):
  """Row variant: rows are (query, head) pairs, one [bt * gp, bk] score matmul per tile (big
  enough for Hopper's warpgroup MMA); the group sum reshapes to [bt, gp, bk] and reduces the
  head axis. Every head of a query shares its visibility, so the mask is applied after."""
  i0 = pl.program_id(0) * bt
  q = q_ref[...]
  if q.ndim == 3:       # q read in place: [bt, gp, dp] -> the bt * gp (query, head) rows
    q = q.reshape(bt * gp, q.shape[-1])
  lse = lse_ref[...]
  lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)     # no visible key (or padded head) -> 0
  rows_t = i0 + _iota(bt)
  qs = qseg_ref[...] if has_seg else None

  def tile_probs(j0):
    s = _dot(q, k_ref[pl.ds(j0, bk), :], prec, tb=True) * scale
    pg = jnp.sum(jnp.exp(s - lse[:, None]).reshape(bt, gp, bk), axis=1)
    vis = _visible(j0, rows_t, cseg_ref, qs, bk=bk, l=l, d=d, n_cmp=n_cmp)
    return jnp.where(vis, pg, 0.0)

  _write_scores(out_ref, mm_ref, ms_ref, tile_probs, i0=i0, bt=bt, bk=bk, bs=bs, l=l, d=d,
                n_cmp=n_cmp, n_out_tiles=n_out_tiles)


def _score_heads_kernel(q_ref, lse_ref, k_ref, qseg_ref, cseg_ref, mm_ref, ms_ref, out_ref, *,
                        scale, bt, g, bk, bs, l, d, n_cmp, n_out_tiles, has_seg, prec):
  """Head-loop variant: rows are bt query positions; the group's heads are summed as they are
  computed (one [bt, bk] score tile live at a time, no group-sum matmul)."""
  i0 = pl.program_id(0) * bt
  rows_t = i0 + _iota(bt)
  qs = qseg_ref[...] if has_seg else None

  def tile_probs(j0):
    k = k_ref[pl.ds(j0, bk), :]
    pg = jnp.zeros((bt, bk), _F32)
    for h in range(g):
      lse = lse_ref[h, :]
      lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)   # no visible key -> p = 0
      pg = pg + jnp.exp(_dot(q_ref[h, :, :], k, prec, tb=True) * scale - lse[:, None])
    vis = _visible(j0, rows_t, cseg_ref, qs, bk=bk, l=l, d=d, n_cmp=n_cmp)
    return jnp.where(vis, pg, 0.0)

  _write_scores(out_ref, mm_ref, ms_ref, tile_probs, i0=i0, bt=bt, bk=bk, bs=bs, l=l, d=d,
                n_cmp=n_cmp, n_out_tiles=n_out_tiles)


def selection_scores(q, k_cmp, lse_cmp, *, cfg: NSAConfig, q_segment_ids=None, interpret=None,
                     config=None):
  """Group-summed selection scores [b, kvh, t, n_slc] f32 (kernel; no [t, n_cmp] tensor).

  Two kernels (NSABlockConfig.score_head_loop): rows = (query, head) pairs of score_block_q
  queries with the group sum as a reduction over heads, or rows = score_block_q queries with a
  static loop over the group's heads (smaller live tiles).
  """
  interpret = resolve_interpret(interpret, GPU)
  bcfg = config or (NSABlockConfig() if interpret else default_block_config())
  t = q.shape[1]
  return _padded_scores(q, k_cmp, lse_cmp, cfg, q_segment_ids, interpret,
                        bcfg)[:, :, :t, :cfg.n_slc(t)]


def _padded_scores(q, k_cmp, lse_cmp, cfg, q_segment_ids, interpret, bcfg):
  """Scores [b, kvh, tq, width]: tq >= t rows, width a power of two >= n_slc (zero-filled)."""
  q, k_cmp, lse_cmp = lax.stop_gradient((q, k_cmp, lse_cmp))
  b, t, h, d = q.shape
  n_cmp, hk = k_cmp.shape[1], k_cmp.shape[2]
  g = h // hk
  gp, dp = _pow2(g, 1), _pow2(d)
  l, st, ls = cfg.block_len, cfg.stride, cfg.select_len
  per = ls // st
  bk = max(bcfg.score_block_k or 0, 16 * per)
  if bk % per:
    raise UnsupportedError(f"score_block_k {bk} must be a multiple of select_len/stride {per}")
  bs = bk // per
  if bs & (bs - 1) or bk & (bk - 1):
    raise UnsupportedError(f"score tiles ({bk} keys, {bs} blocks) must be powers of two")
  if l > bs * ls:
    raise UnsupportedError(f"block_len {l} spills past one score tile")
  bt = _pow2(bcfg.score_block_q)
  head_loop = bcfg.score_head_loop
  if head_loop:
    # Triton keeps the group's q tiles in shared memory (loop-invariant loads): halve the
    # query tile until they fit, else use the row kernel.
    while bt > 16 and gp * bt * dp * q.dtype.itemsize > _SCORE_Q_SMEM:
      bt //= 2
    head_loop = gp * bt * dp * q.dtype.itemsize <= _SCORE_Q_SMEM
  if not head_loop:
    while bt > 16 and bt * gp > _SCORE_ROWS:
      bt //= 2
    if bt * gp > _SCORE_ROWS:
      raise UnsupportedError(f"GQA group of {g} query heads: {bt * gp} (query, head) rows per "
                             f"score tile exceed {_SCORE_ROWS}; use score_head_loop=True")
  n_slc = cfg.n_slc(t)
  scale = float(d ** -0.5 if cfg.scale is None else cfg.scale)
  tq = -(-t // bt) * bt
  ncp = max(bk, -(-n_cmp // bk) * bk)
  n_tiles_total = ncp // bk
  lse = lse_cmp.astype(_F32).reshape(b, hk, g, t)
  kc = _pad_axis(_pad_axis(k_cmp, 1, ncp), 3, dp)
  has_seg = q_segment_ids is not None
  if has_seg:
    qseg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, tq, -1)
    cseg = _pad_axis(compress.block_segments(q_segment_ids, n_cmp, l, st), 1, ncp, -2)
  else:
    qseg = jnp.zeros((b, tq), jnp.int32)
    cseg = jnp.zeros((b, ncp), jnp.int32)
  w = compress.overlap_matrix(2 * bk, 2 * bs, l, st, ls)
  # The row kernel maps with three bf16 tensor-core dots when the weights are exact in bf16
  # (H200, 64k paper shape: 12.6 ms; the f32 map is scalar FMA work). The head loop keeps the
  # f32 map: with the bf16 dots it took 39.8 ms instead of 14.3 ms ([16, bk] tiles).
  if not head_loop and np.array_equal(w, w.astype(jnp.bfloat16).astype(np.float32)):
    w = w.astype(jnp.bfloat16)
  mm, ms = jnp.asarray(w[:bk, :bs]), jnp.asarray(w[:bk, bs:])
  # a power of two >= both: the top-n kernel reads the first pow2(n_slc) columns as one block
  width = _pow2(max((n_tiles_total + 1) * bs, n_slc), bs)
  common = dict(scale=scale, bt=bt, bk=bk, bs=bs, l=l, d=st, n_cmp=n_cmp,
                n_out_tiles=width // bs, has_seg=has_seg, prec=_prec(q.dtype))
  q5 = _pad_axis(_pad_axis(q.reshape(b, t, hk, g, d), 4, dp), 1, tq)   # [b, tq, hk, g, dp]
  if head_loop:
    qt = _pad_axis(q5, 3, gp).transpose(0, 2, 3, 1, 4)                  # [b, hk, gp, tq, dp]
    lse = _pad_axis(_pad_axis(lse, 2, gp, -jnp.inf), 3, tq, -jnp.inf)   # [b, hk, gp, tq]
    kern = functools.partial(_score_heads_kernel, g=g, **common)
    q_spec = pl.BlockSpec((None, None, gp, bt, dp), lambda i, j, z: (z, j, 0, i, 0))
    lse_spec = pl.BlockSpec((None, None, gp, bt), lambda i, j, z: (z, j, 0, i))
    seg_spec = pl.BlockSpec((None, bt), lambda i, j, z: (z, i))
  else:
    lse = lse.transpose(0, 1, 3, 2)
    lse = _pad_axis(_pad_axis(lse, 3, gp, -jnp.inf), 2, tq, -jnp.inf).reshape(b, hk, tq * gp)
    r = bt * gp
    kern = functools.partial(_score_kernel, gp=gp, **common)
    if bcfg.score_q_in_place and g == gp and d == dp and t == tq:
      # q in place: the [bt, g, d] block of query tile i and kv head j is the program's rows
      # in the kernel's (query, head) order (NSABlockConfig.score_q_in_place says why it is
      # off by default).
      qt = q
      q_spec = pl.BlockSpec((None, bt, gp, dp), lambda i, j, z: (z, i, j, 0))
    else:
      qt = _pad_axis(q5, 3, gp).transpose(0, 2, 1, 3, 4).reshape(b, hk, tq * gp, dp)
      q_spec = pl.BlockSpec((None, None, r, dp), lambda i, j, z: (z, j, i, 0))
    lse_spec = pl.BlockSpec((None, None, r), lambda i, j, z: (z, j, i))
    seg_spec = pl.BlockSpec((None, bt), lambda i, j, z: (z, i))
  return pl.pallas_call(
      kern, grid=(tq // bt, hk, b),
      in_specs=[
          q_spec, lse_spec,
          pl.BlockSpec((None, ncp, None, dp), lambda i, j, z: (z, 0, j, 0)),
          seg_spec,
          pl.BlockSpec((None, ncp), lambda i, j, z: (z, 0)),
          pl.BlockSpec((bk, bs), lambda i, j, z: (0, 0)),
          pl.BlockSpec((bk, bs), lambda i, j, z: (0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, bt, width), lambda i, j, z: (z, j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hk, tq, width), _F32),
      interpret=interpret, name="nsa_selection_scores",
      **_compiler(interpret, bcfg.score_num_warps, bcfg.score_num_stages),
  )(qt, lse, kc, qseg, cseg, mm, ms)


def select_blocks(q, k_cmp, lse_cmp, *, cfg: NSAConfig, q_segment_ids=None, interpret=None,
                  config=None):
  """Score kernel, then the top-n kernel (ops/nsa/topn_triton.py) on the padded scores
  (NSABlockConfig.topn_kernel=False: XLA's top_k + sort via select_from_scores)."""
  interpret = resolve_interpret(interpret, GPU)
  bcfg = config or (NSABlockConfig() if interpret else default_block_config())
  t = q.shape[1]
  seg_start = None if q_segment_ids is None else compress.segment_starts(q_segment_ids)
  p = _padded_scores(q, k_cmp, lse_cmp, cfg, q_segment_ids, interpret, bcfg)
  if not bcfg.topn_kernel:
    return select_from_scores(p[:, :, :t, :cfg.n_slc(t)], jnp.arange(t, dtype=jnp.int32), cfg,
                              seg_start)
  return topn_triton.topn_from_padded_scores(
      p, t, cfg, seg_start, tile_elems=bcfg.topn_tile_elems,
      num_warps=bcfg.topn_num_warps, interpret=interpret)
