"""The "splash" implementation: JAX's TPU splash attention (Pallas Mosaic).

Covers causal / local-window masks with q_offset, segment ids, soft_cap and GQA (one MQA
kernel per kv head). Sinks, kv_valid, return_lse and lengths that are not multiples of 128
raise UnsupportedError (splash gives masked-out rows a uniform average, not 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._backend import TPU, UnsupportedError, resolve_interpret
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sm


def _blocks(lq, lk, cfg):
  bq = min(512, lq)
  bk = min(512, lk)
  return _sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                        block_kv_dq=bk)


def attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid, scale,
              soft_cap, q_offset, return_lse, interpret, config):
  interpret = resolve_interpret(interpret, TPU)
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  g = h // hk
  reasons = []
  if return_lse:
    reasons.append("return_lse")
  if kv_valid is not None:
    reasons.append("kv_valid")
  if window is not None and sinks:
    reasons.append("sinks")
  if lq % 128 or lk % 128:
    reasons.append(f"lengths {lq}/{lk} not multiples of 128")
  if window is None and causal and q_offset < 0:
    reasons.append("negative q_offset")
  if q_segment_ids is not None and not causal:
    reasons.append("segment ids without causal (rows may be fully masked)")
  if reasons:
    raise UnsupportedError(", ".join(reasons))
  if window is not None:
    m = _sm.LocalMask((lq, lk), window_size=(window - 1, 0 if causal else None), offset=q_offset)
  elif causal:
    m = _sm.CausalMask((lq, lk), offset=q_offset)
  else:
    m = _sm.FullMask((lq, lk))
  kernel = _sk.make_splash_mqa_single_device(
      _sm.MultiHeadMask([m] * g), block_sizes=_blocks(lq, lk, config),
      attn_logits_soft_cap=soft_cap, interpret=interpret)
  # Splash does not scale: fold the scale into q.
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  qs = qs.reshape(b, lq, hk, g, d).transpose(0, 2, 3, 1, 4)  # [b, hk, g, lq, d]
  kt = k.transpose(0, 2, 1, 3)  # [b, hk, lk, d]
  vt = v.transpose(0, 2, 1, 3)
  if q_segment_ids is not None:
    seg = _sk.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
    per_batch = lambda qb, kb, vb, sb: jax.vmap(lambda x, y, z: kernel(x, y, z, segment_ids=sb))(
        qb, kb, vb)
    o = jax.vmap(per_batch)(qs, kt, vt, seg)
  else:
    o = jax.vmap(jax.vmap(kernel))(qs, kt, vt)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, v.shape[-1])
  return o.astype(q.dtype), None
