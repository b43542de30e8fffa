"""Public attention API: `attention` (training / prefill) and `decode_attention` (KV cache).

Implementations register below inside ``try/except ImportError``; see ops/_backend.py for the
dispatch rules (None = platform default order ending in "xla", a name, or a sequence).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import _backend, _stacked
from ops._backend import CPU, GPU, TPU
from ops.attention import reference

# GPU: cuDNN first. H200, bf16, B1 H16 D128 causal, 8k-32k, same run (session 12): the Mosaic
# GPU forward ran at 1.02-1.03x cuDNN and 0.80-0.85x forward+backward (its backward is
# Triton's); the Triton kernels at 0.75-0.84x / 0.76-0.79x. So Mosaic GPU serves what cuDNN
# refuses (return_lse, q_offset != 0, odd lengths) when it covers the call (causal / full,
# bf16/f16, head_dim 64/128), and Triton the rest (kv_valid, segments, window, sinks, soft_cap,
# f32...).
_ATTENTION = _backend.Op("attention", {
    GPU: ("cudnn", "pallas_mosaic_gpu", "pallas_triton", "xla"),
    TPU: ("pallas_tpu", "splash", "xla"),
    CPU: ("xla",),
})
_DECODE = _backend.Op("decode_attention", {
    GPU: ("pallas_triton", "xla"),
    TPU: ("xla",),
    CPU: ("xla",),
})


def _xla_attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid,
                   scale, soft_cap, q_offset, return_lse, interpret, config):
  del return_lse, interpret, config
  return reference.attention(q, k, v, causal=causal, window=window, sinks=sinks,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             kv_valid=kv_valid, scale=scale, soft_cap=soft_cap, q_offset=q_offset)


def _xla_decode(q, k_cache, v_cache, lengths, *, layer, window, sinks, scale, soft_cap,
                return_lse, interpret, config):
  del return_lse, interpret, config
  if layer is not None:   # fused into the consumers: no copy of the layer
    k_cache, v_cache = _stacked.layer_slice(k_cache, layer), _stacked.layer_slice(v_cache, layer)
  return reference.decode_attention(q, k_cache, v_cache, lengths, window=window, sinks=sinks,
                                    scale=scale, soft_cap=soft_cap)


_ATTENTION.register("xla", _xla_attention)
_DECODE.register("xla", _xla_decode)

try:
  from ops.attention import pallas_triton as _pallas_triton
  _ATTENTION.register("pallas_triton", _pallas_triton.attention, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.attention import pallas_mosaic_gpu as _pallas_mosaic_gpu
  _ATTENTION.register("pallas_mosaic_gpu", _pallas_mosaic_gpu.attention, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.attention import decode_triton as _decode_triton
  _DECODE.register("pallas_triton", _decode_triton.decode_attention, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.attention import pallas_tpu as _pallas_tpu
  _ATTENTION.register("pallas_tpu", _pallas_tpu.attention, platforms=(TPU,))
except ImportError:
  pass
try:
  from ops.attention import cudnn as _cudnn
  _ATTENTION.register("cudnn", _cudnn.attention, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.attention import splash as _splash
  _ATTENTION.register("splash", _splash.attention, platforms=(TPU,))
except ImportError:
  pass


def implementations() -> tuple[str, ...]:
  """Names registered for `attention`."""
  return _ATTENTION.names


def decode_implementations() -> tuple[str, ...]:
  return _DECODE.names


def _check_qkv(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, len, heads, head_dim]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  b, _, h, d = q.shape
  if k.shape[0] != b or v.shape[0] != b or k.shape[2] != v.shape[2] or k.shape[1] != v.shape[1]:
    raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape[3] != d:
    raise ValueError(f"k head_dim {k.shape[3]} != q head_dim {d}")
  if h % k.shape[2]:
    raise ValueError(f"heads {h} not a multiple of kv_heads {k.shape[2]}")


def _check_common(window, sinks, soft_cap):
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if sinks < 0:
    raise ValueError(f"sinks must be >= 0, got {sinks}")
  if soft_cap is not None and soft_cap <= 0:
    raise ValueError(f"soft_cap must be > 0, got {soft_cap}")


def attention(q, k, v, *, causal: bool = False, window: int | None = None, sinks: int = 0,
              q_segment_ids=None, kv_segment_ids=None, kv_valid=None, scale: float | None = None,
              soft_cap: float | None = None, q_offset: int | None = None,
              return_lse: bool = False, implementation=None, interpret: bool | None = None,
              config=None):
  """Multi-head attention with GQA/MQA, causal, sliding window, sinks, segments and padding.

  q: [batch, q_len, heads, head_dim]; k: [batch, kv_len, kv_heads, head_dim];
  v: [batch, kv_len, kv_heads, head_dim_v] (head_dim_v may differ); heads % kv_heads == 0.
  Query i sits at position i + q_offset (default kv_len - q_len: bottom-right aligned, so
  chunked prefill works). causal: key j visible iff j <= pos(i). window=w: additionally
  pos(i) - w < j (w keys including itself). sinks=n: keys j < n are visible even outside the
  window (still subject to causality). q_segment_ids [batch, q_len] / kv_segment_ids
  [batch, kv_len] int32: only equal ids attend. kv_valid [batch, kv_len] bool: False keys are
  never attended. scale defaults to 1/sqrt(head_dim). soft_cap c: logits = c*tanh(logits/c).
  A query with no visible key outputs 0 and lse = -inf.

  Returns o [batch, q_len, heads, head_dim_v] in q.dtype, and with return_lse also
  lse [batch, heads, q_len] float32 (natural log). Differentiable in q, k, v (and through lse).
  `implementation`: None (platform default order), a name or a sequence of names; `config`:
  an AttentionBlockConfig for the Pallas kernels (None = per-device default).
  """
  _check_qkv(q, k, v)
  _check_common(window, sinks, soft_cap)
  b, lq, _, d = q.shape
  lk = k.shape[1]
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  if q_segment_ids is not None:
    if q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
      raise ValueError(f"segment ids must be [batch, q_len] / [batch, kv_len]; got "
                       f"{q_segment_ids.shape}, {kv_segment_ids.shape}")
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
  if kv_valid is not None:
    if kv_valid.shape != (b, lk):
      raise ValueError(f"kv_valid must be [batch, kv_len] = {(b, lk)}; got {kv_valid.shape}")
    kv_valid = kv_valid.astype(bool)
  scale = float(d ** -0.5 if scale is None else scale)
  q_offset = int(lk - lq if q_offset is None else q_offset)
  o, lse = _ATTENTION(implementation, q, k, v, causal=bool(causal), window=window,
                      sinks=int(sinks), q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, kv_valid=kv_valid, scale=scale,
                      soft_cap=None if soft_cap is None else float(soft_cap), q_offset=q_offset,
                      return_lse=return_lse, interpret=interpret, config=config)
  return (o, lse) if return_lse else o


def decode_attention(q, k_cache, v_cache, lengths, *, layer=None, window: int | None = None,
                     sinks: int = 0, scale: float | None = None, soft_cap: float | None = None,
                     return_lse: bool = False, implementation=None,
                     interpret: bool | None = None, config=None):
  """A few new tokens against a long KV cache (forward only).

  q: [batch, q_len (small), heads, head_dim]; k_cache: [batch, max_len, kv_heads, head_dim];
  v_cache: [batch, max_len, kv_heads, head_dim_v]; lengths: [batch] int32 = number of valid
  cache entries INCLUDING the q_len new tokens (already written). New token t sits at position
  lengths[b] - q_len + t; causal among them; keys >= lengths[b] are ignored. window / sinks /
  scale / soft_cap as in `attention`. Returns o [batch, q_len, heads, head_dim_v] (and lse
  [batch, heads, q_len] f32 with return_lse).

  layer: None, or an int / int32 scalar (traced inside a scan over layers is fine) when the
  caches are all layers' caches stacked, [layers, batch, max_len, kv_heads, head_dim(_v)]:
  the kernels read that layer in place instead of XLA copying its slice out first.
  """
  if layer is not None:
    if k_cache.ndim != 5 or v_cache.ndim != 5 or k_cache.shape[0] != v_cache.shape[0]:
      raise ValueError(f"with layer=, k_cache and v_cache must be [layers, batch, max_len, "
                       f"kv_heads, head_dim]; got {k_cache.shape}, {v_cache.shape}")
    layer = _stacked.check_layer(layer, k_cache.shape[0], "decode_attention")
    _check_qkv(q, jax.ShapeDtypeStruct(k_cache.shape[1:], k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape[1:], v_cache.dtype))
  else:
    _check_qkv(q, k_cache, v_cache)
  _check_common(window, sinks, soft_cap)
  lengths = jnp.asarray(lengths, jnp.int32)
  if lengths.shape != (q.shape[0],):
    raise ValueError(f"lengths must be [batch] = {(q.shape[0],)}; got {lengths.shape}")
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  o, lse = _DECODE(implementation, q, k_cache, v_cache, lengths, layer=layer, window=window,
                   sinks=int(sinks), scale=scale,
                   soft_cap=None if soft_cap is None else float(soft_cap),
                   return_lse=return_lse, interpret=interpret, config=config)
  return (o, lse) if return_lse else o
