"""Plain-jnp NSA with dense masks: the ground truth ("xla" implementation).

O(T²) memory for the selected branch (a dense [b, kvh, t, t] mask): meant for tests and short
sequences. Gradients come from autodiff; selection is stop_gradient-ed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.nsa import compress
from ops.nsa.config import NSAConfig
from ops.nsa.select import select_from_scores

HIGHEST = jax.lax.Precision.HIGHEST


def masked_attention(q, k, v, mask, *, scale, precision=HIGHEST):
  """q [b,q,h,d], k [b,kv,hk,d], v [b,kv,hk,dv], mask [b, hk or 1, q, kv] bool.

  Returns o [b,q,h,dv] (q.dtype; 0 where a query sees no key) and lse [b,h,q] f32 (-inf there).
  """
  b, lq, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  qf = q.astype(jnp.float32).reshape(b, lq, hk, g, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=precision) * scale
  m4 = mask[:, :, None]
  m = jax.lax.stop_gradient(jnp.max(jnp.where(m4, s, -jnp.inf), axis=-1, keepdims=True,
                                     initial=-jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  # exp of the MASKED scores: a masked score far above the row max would overflow exp(s - m)
  # to inf, and where's gradient would turn 0 * inf into NaN
  p = jnp.where(m4, jnp.exp(jnp.where(m4, s, -jnp.inf) - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p / l_safe, v.astype(jnp.float32), precision=precision)
  lse = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)[..., 0].reshape(b, h, lq)
  return o.reshape(b, lq, h, v.shape[-1]).astype(q.dtype), lse


def _scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else scale


def _cmp_mask(q, n_cmp, block_len, stride, q_segment_ids):
  b, t = q.shape[:2]
  pos = jnp.arange(t, dtype=jnp.int32)
  if q_segment_ids is None:
    vis = compress.cmp_visible(pos, n_cmp, block_len, stride)[None]
    return jnp.broadcast_to(vis, (b, t, n_cmp))
  cseg = compress.block_segments(q_segment_ids, n_cmp, block_len, stride)
  return compress.cmp_visible(jnp.broadcast_to(pos, (b, t)), n_cmp, block_len, stride,
                              q_segment_ids, cseg)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, q_segment_ids=None, scale=None):
  """Query t attends compressed key j iff j*stride + block_len - 1 <= t (same segment).

  q [b,t,h,d], k_cmp [b,n_cmp,kvh,d], v_cmp [b,n_cmp,kvh,dv] -> (o [b,t,h,dv], lse [b,h,t]).
  """
  mask = _cmp_mask(q, k_cmp.shape[1], block_len, stride, q_segment_ids)
  return masked_attention(q, k_cmp, v_cmp, mask[:, None], scale=_scale(q, scale))


def cmp_probs_grouped(q, k_cmp, lse_cmp, *, block_len, stride, q_segment_ids=None, scale=None):
  """p_cmp = exp(q·k_cmp*scale - lse) on visible blocks, summed over each GQA group's heads.

  Returns [b, kvh, t, n_cmp] f32 (stop_gradient).
  """
  q, k_cmp, lse_cmp = jax.lax.stop_gradient((q, k_cmp, lse_cmp))
  b, t, h, d = q.shape
  n_cmp, hk = k_cmp.shape[1], k_cmp.shape[2]
  g = h // hk
  mask = _cmp_mask(q, n_cmp, block_len, stride, q_segment_ids)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q.astype(jnp.float32).reshape(b, t, hk, g, d),
                 k_cmp.astype(jnp.float32), precision=HIGHEST) * _scale(q, scale)
  lse = lse_cmp.reshape(b, hk, g, t)[..., None]
  p = jnp.where(mask[:, None, None] & jnp.isfinite(lse), jnp.exp(s - lse), 0.0)
  return p.sum(2)


def selection_scores(q, k_cmp, lse_cmp, *, cfg: NSAConfig, q_segment_ids=None):
  """Group-summed selection-block scores [b, kvh, t, n_slc] f32 (dense overlap matrix)."""
  t = q.shape[1]
  p = cmp_probs_grouped(q, k_cmp, lse_cmp, block_len=cfg.block_len, stride=cfg.stride,
                        q_segment_ids=q_segment_ids, scale=cfg.scale)
  w = compress.overlap_matrix(k_cmp.shape[1], cfg.n_slc(t), cfg.block_len, cfg.stride,
                              cfg.select_len)
  return jnp.einsum("bhqj,js->bhqs", p, jnp.asarray(w), precision=HIGHEST)


def select_blocks(q, k_cmp, lse_cmp, *, cfg: NSAConfig, q_segment_ids=None):
  """block_idx [b, t, kvh, n_select] int32 (-1 padded); see select.select_from_scores."""
  t = q.shape[1]
  p = selection_scores(q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=q_segment_ids)
  seg_start = None if q_segment_ids is None else compress.segment_starts(q_segment_ids)
  return select_from_scores(p, jnp.arange(t, dtype=jnp.int32), cfg, seg_start)


def selected_mask(block_idx, t_kv, select_len, q_segment_ids=None):
  """Dense mask [b, kvh, t, t_kv]: key j visible iff its block j//l' is selected, j <= t."""
  b, t, hk, n = block_idx.shape
  n_slc = -(-t_kv // select_len)
  onehot = (block_idx[..., None] == jnp.arange(n_slc, dtype=jnp.int32)).any(-2)  # b,t,hk,n_slc
  kblk = jnp.arange(t_kv, dtype=jnp.int32) // select_len
  sel = jnp.take(onehot, kblk, axis=-1).transpose(0, 2, 1, 3)                  # b,hk,t,t_kv
  causal = jnp.arange(t_kv)[None, :] <= jnp.arange(t)[:, None]
  mask = sel & causal[None, None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, None, :, None] == q_segment_ids[:, None, None, :])
  return mask


def selected_attention(q, k_slc, v_slc, block_idx, *, select_len, q_segment_ids=None,
                       scale=None):
  """Query t attends keys of its selected blocks with j <= t. -> (o, lse [b,h,t])."""
  mask = selected_mask(block_idx, k_slc.shape[1], select_len, q_segment_ids)
  return masked_attention(q, k_slc, v_slc, mask, scale=_scale(q, scale))


def window_attention(q, k_win, v_win, *, window, q_segment_ids=None, scale=None):
  t = q.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
  mask = jnp.broadcast_to(mask, (q.shape[0], t, t))
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == q_segment_ids[:, None, :])
  return masked_attention(q, k_win, v_win, mask[:, None], scale=_scale(q, scale))


def combine(gates, o_cmp, o_slc, o_win, dtype):
  g = gates.astype(jnp.float32)
  o = (g[..., 0:1] * o_cmp.astype(jnp.float32) + g[..., 1:2] * o_slc.astype(jnp.float32)
       + g[..., 2:3] * o_win.astype(jnp.float32))
  return o.astype(dtype)


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cfg: NSAConfig,
        q_segment_ids=None, block_idx=None):
  """Full NSA in dense jnp. Returns (o [b,t,h,dv], block_idx)."""
  o_cmp, lse_cmp = compressed_attention(q, k_cmp, v_cmp, block_len=cfg.block_len,
                                        stride=cfg.stride, q_segment_ids=q_segment_ids,
                                        scale=cfg.scale)
  if block_idx is None:
    block_idx = select_blocks(q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=q_segment_ids)
  o_slc, _ = selected_attention(q, k_slc, v_slc, block_idx, select_len=cfg.select_len,
                                q_segment_ids=q_segment_ids, scale=cfg.scale)
  o_win, _ = window_attention(q, k_win, v_win, window=cfg.window,
                              q_segment_ids=q_segment_ids, scale=cfg.scale)
  return combine(gates, o_cmp, o_slc, o_win, q.dtype), block_idx
