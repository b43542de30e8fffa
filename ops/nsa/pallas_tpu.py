"""NSA for TPUs in Pallas (Mosaic lowering): the "pallas_tpu" implementation's entry points.

The compressed branch runs on ops.attention's TPU flash kernels (`compressed_attention` below:
compress.compressed_attention_flash packs the d queries that share a visible prefix of
compressed keys into the head axis, which turns block-granular causality into plain causal
attention, with lse). Selection scores have their own kernel (`selection_scores`: group-summed
compressed-attention probabilities mapped onto selection blocks, no [t, n_cmp] tensor); the
top-n pick itself stays XLA (lax.top_k in ops.nsa.select, shared by every implementation).

The kernels live in their own modules; this one holds the entry points that ops/nsa/api.py
registers as "pallas_tpu" and the custom_vjp that ties the selected-attention kernels together:
  tpu_selected.py         selected-block attention kernels (fwd, dq, dk/dv) and their calls
  tpu_selected_layout.py  their static geometry and XLA-side unions / (block, tile) pairs
  tpu_scores.py           the selection-score kernel (`selection_scores`)
  tpu_common.py           compiler params, precision, MXU contractions, padding
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ops._backend import TPU, UnsupportedError, resolve_interpret
from ops.nsa import compress
from ops.nsa.config import NSABlockConfig, default_block_config
from ops.nsa.select import select_from_scores
from ops.nsa.tpu_common import _F32, _SUPPORTED_DTYPES, _pad_axis
from ops.nsa.tpu_scores import selection_scores
from ops.nsa.tpu_selected import _bwd, _fwd
from ops.nsa.tpu_selected_layout import _Geom, _layout, _unions


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
