"""NSA selection scores for TPUs in Pallas (Mosaic): group-summed compressed-attention
probabilities mapped onto selection blocks, without a [t, n_cmp] tensor."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops._backend import TPU, UnsupportedError, resolve_interpret
from ops.nsa import compress
from ops.nsa.config import NSABlockConfig, default_block_config
from ops.nsa.tpu_common import _F32, _SUPPORTED_DTYPES, _dims, _nn, _nt, _pad_axis, _prec


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

