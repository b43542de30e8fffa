"""The "cudnn" implementation: jax.nn.dot_product_attention(implementation="cudnn").

cuDNN's fused flash attention covers causal (top-left aligned), a left sliding window, GQA and
bf16/fp16; everything else raises UnsupportedError so dispatch moves on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._backend import GPU, UnsupportedError, platform


def attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid, scale,
              soft_cap, q_offset, return_lse, interpret, config):
  del interpret, config
  if platform() != GPU:
    raise UnsupportedError(f"cuDNN needs a GPU (running on {platform()})")
  reasons = []
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    reasons.append(f"dtype {q.dtype} (bf16/fp16 only)")
  if return_lse:
    reasons.append("return_lse")
  if soft_cap is not None:
    reasons.append("soft_cap")
  if kv_valid is not None:
    reasons.append("kv_valid")
  if q_segment_ids is not None:
    reasons.append("segment ids")
  if window is not None and sinks:
    reasons.append("sinks")
  if window is not None and not causal:
    reasons.append("non-causal window")
  lq, lk = q.shape[1], k.shape[1]
  if (causal or window is not None) and q_offset != 0:
    reasons.append(f"q_offset {q_offset} (cuDNN's causal mask is top-left aligned)")
  d, dv = q.shape[3], v.shape[3]
  if d % 8 or d > 256 or dv != d:
    reasons.append(f"head_dim {d}/{dv}")
  if lq < 2 or lk < 2:
    reasons.append("sequence length < 2")
  if reasons:
    raise UnsupportedError(", ".join(reasons))
  try:
    o = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn")
  except (ValueError, RuntimeError) as e:  # cuDNN shape / version checks at trace time
    raise UnsupportedError(f"cuDNN refused: {e}") from e
  return o, None
