"""Plain-jnp attention: the ground truth ("xla" implementation).

Softmax in float32 over dense masks; gradients come from autodiff. Works for every
feature of :func:`ops.attention.attention` and :func:`ops.attention.decode_attention`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visible(q_pos, kv_pos, *, causal, window, sinks):
  """Positional visibility. q_pos [..., q, 1], kv_pos [..., 1, kv] int32 -> bool [..., q, kv]."""
  ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), bool)
  if causal:
    ok = ok & (kv_pos <= q_pos)
  if window is not None:
    in_window = kv_pos > q_pos - window
    if sinks:
      in_window = in_window | (kv_pos < sinks)
    ok = ok & in_window
  return ok


def build_mask(batch, q_len, kv_len, *, q_pos, causal, window, sinks,
               q_segment_ids=None, kv_segment_ids=None, kv_valid=None):
  """Dense mask [batch, q_len, kv_len]. q_pos: [batch, q_len] int32 query positions."""
  kv_pos = jnp.arange(kv_len, dtype=jnp.int32)
  mask = visible(q_pos[:, :, None], kv_pos[None, None, :], causal=causal, window=window,
                 sinks=sinks)
  mask = jnp.broadcast_to(mask, (batch, q_len, kv_len))
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, :].astype(bool)
  return mask


def masked_attention(q, k, v, mask, *, scale, soft_cap, precision=jax.lax.Precision.HIGHEST):
  """q [b,q,h,d], k [b,kv,hk,d], v [b,kv,hk,dv], mask [b,q,kv] -> (o [b,q,h,dv], lse [b,h,q])."""
  b, lq, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  qf = q.astype(jnp.float32).reshape(b, lq, hk, g, d)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=precision) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  m4 = mask[:, None, None, :, :]
  m = jax.lax.stop_gradient(jnp.max(jnp.where(m4, s, -jnp.inf), axis=-1, keepdims=True))
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


def attention(q, k, v, *, causal=False, window=None, sinks=0, q_segment_ids=None,
              kv_segment_ids=None, kv_valid=None, scale=None, soft_cap=None, q_offset=None,
              precision=jax.lax.Precision.HIGHEST):
  """Reference of ops.attention.attention; returns (o, lse)."""
  b, lq, h, d = q.shape
  lk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  q_offset = lk - lq if q_offset is None else q_offset
  q_pos = jnp.broadcast_to(jnp.arange(lq, dtype=jnp.int32)[None] + q_offset, (b, lq))
  mask = build_mask(b, lq, lk, q_pos=q_pos, causal=causal, window=window, sinks=sinks,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                    kv_valid=kv_valid)
  return masked_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap, precision=precision)


def decode_attention(q, k_cache, v_cache, lengths, *, window=None, sinks=0, scale=None,
                     soft_cap=None, precision=jax.lax.Precision.HIGHEST):
  """Reference of ops.attention.decode_attention; returns (o, lse)."""
  b, lq, h, d = q.shape
  lk = k_cache.shape[1]
  scale = d ** -0.5 if scale is None else scale
  lengths = jnp.asarray(lengths, jnp.int32)
  q_pos = lengths[:, None] - lq + jnp.arange(lq, dtype=jnp.int32)[None]
  kv_valid = jnp.arange(lk, dtype=jnp.int32)[None] < lengths[:, None]
  mask = build_mask(b, lq, lk, q_pos=q_pos, causal=True, window=window, sinks=sinks,
                    kv_valid=kv_valid)
  return masked_attention(q, k_cache, v_cache, mask, scale=scale, soft_cap=soft_cap,
                          precision=precision)
