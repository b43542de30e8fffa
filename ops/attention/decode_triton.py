"""Flash-decoding on GPU (Pallas, Triton lowering): a few new tokens against a long KV cache.

The cache length is split into `decode_splits` chunks processed in parallel; each program
handles one (chunk, batch, kv head) and all group heads × new tokens of that kv head as the rows
of one tile (so GQA reads each k/v block once). Chunks past `lengths[b]` do no work. The
partial results (normalised output + lse per chunk) are merged with a logsumexp in XLA.

The caches are read in place, never padded or sliced by XLA (a copy would move more bytes than
the decode reads): a layer-stacked cache is indexed at the layer inside the kernel, and a block
running past the end of the cache loads the last block_kv rows (offset clamped) and masks by
position. Only a cache shorter than 16 rows or a head dim that is not a power of two is padded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops import _stacked
from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.attention import _blocks
from ops.attention.config import AttentionBlockConfig, default_config
from ops.attention.pallas_triton import (LN2, _CompilerParams, _SUPPORTED_DTYPES, _dot,
                                         _dot_nt, _logits)


def _decode_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, q_len, group,
                   window, sinks, scale, soft_cap, block_kv, chunk):
  n = len_ref[()]
  layer = layer_ref[()]
  max_len = k_ref.shape[1]       # k_ref, v_ref: [layers, max_len, head_dim]
  rows = q_ref.shape[0]
  split = pl.program_id(0)
  q = q_ref[...]
  # Row r holds new token r // group; its position is n - q_len + r // group.
  tok = lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), jnp.int32(group))
  q_pos = n - q_len + tok
  s0 = split * (chunk // block_kv)
  s1 = s0 + chunk // block_kv
  hi = jnp.minimum(lax.div(n + block_kv - 1, jnp.int32(block_kv)), s1)
  if window is not None:
    lo = lax.div(jnp.maximum(n - q_len - window + 1, 0), jnp.int32(block_kv))
  else:
    lo = jnp.int32(0)
  ranges = [(jnp.maximum(lo, s0), hi)]
  if window is not None and sinks > 0:
    sink_hi = jnp.minimum(jnp.int32(-(-sinks // block_kv)), lo)
    ranges.insert(0, (s0, jnp.minimum(sink_hi, hi)))

  def body(j, carry):
    acc, m, l = carry
    ks = j * block_kv
    off = jnp.minimum(ks, max_len - block_kv)   # the last block may overlap the one before
    k = k_ref[layer, pl.ds(off, block_kv), :]
    v = v_ref[layer, pl.ds(off, block_kv), :]
    s, _ = _logits(_dot_nt(q, k), scale, soft_cap)
    k_pos = off + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    ok = (k_pos >= ks) & (k_pos <= q_pos) & (k_pos < n)
    if window is not None:
      in_w = k_pos > q_pos - window
      if sinks > 0:
        in_w = in_w | (k_pos < sinks)
      ok = ok & in_w
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros((rows, v_ref.shape[-1]), jnp.float32),
           jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  for lo_r, hi_r in ranges:
    carry = lax.fori_loop(lo_r, hi_r, body, carry)
  acc, m, l = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / l_safe[:, None]
  m_use = jnp.where(m == -jnp.inf, 0.0, m)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m_use + jnp.log2(l_safe)) * LN2)


def decode_attention(q, k_cache, v_cache, lengths, *, layer, window, sinks, scale, soft_cap,
                     return_lse, interpret, config):
  """The "pallas_triton" implementation of ops.attention.decode_attention; returns (o, lse).
  k_cache / v_cache: [batch, max_len, kv_heads, d] (layer None) or [layers, batch, ...]."""
  del return_lse
  interpret = resolve_interpret(interpret, GPU)
  if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
    raise UnsupportedError(f"mixed dtypes {q.dtype}/{k_cache.dtype}/{v_cache.dtype}")
  if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  b, lq, h, d = q.shape
  hk, dv = k_cache.shape[-2], v_cache.shape[-1]
  g = h // hk
  if max(d, dv) > 256:
    raise UnsupportedError(f"head_dim {max(d, dv)} > 256")
  if lq * g > 128:
    raise UnsupportedError(f"q_len * group = {lq * g} > 128 rows per tile")
  cfg = config or default_config(d)
  if not isinstance(cfg, AttentionBlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an AttentionBlockConfig")
  dp, dvp = _blocks.pow2_at_least(d), _blocks.pow2_at_least(dv)
  rows = _blocks.pow2_at_least(lq * g)
  # in place unless a head dim is not a power of two or the cache is under one 16-row block
  (kc, vc), layer = _stacked.for_kernel((k_cache, v_cache), layer, 16, (dp, dvp))
  n_rows = kc.shape[2]
  # the largest power-of-two block inside the cache, so the clamped last block stays in it
  bk = max(16, min(cfg.decode_block_kv, 1 << (n_rows.bit_length() - 1)))
  n_blocks = -(-n_rows // bk)
  splits = max(1, min(cfg.decode_splits, n_blocks))
  chunk = -(-n_blocks // splits) * bk
  splits = -(-n_rows // chunk)

  # [b, lq, hk, g, d] -> [b, hk, lq*g (token-major), d], padded to a power-of-two tile.
  q2 = q.reshape(b, lq, hk, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, lq * g, d)
  q2 = jnp.pad(q2, ((0, 0), (0, 0), (0, rows - lq * g), (0, dp - d)))
  n_layers = kc.shape[0]

  kernel = functools.partial(
      _decode_kernel, q_len=lq, group=g, window=window,
      sinks=sinks if window is not None else 0, scale=scale, soft_cap=soft_cap, block_kv=bk,
      chunk=chunk)
  o_part, lse_part = pl.pallas_call(
      kernel,
      grid=(splits, b, hk),
      in_specs=[
          pl.BlockSpec((None,), lambda s, bi, hi: (bi,)),
          pl.BlockSpec((None,), lambda s, bi, hi: (0,)),
          pl.BlockSpec((None, None, rows, dp), lambda s, bi, hi: (bi, hi, 0, 0)),
          pl.BlockSpec((n_layers, None, n_rows, None, dp), lambda s, bi, hi: (0, bi, 0, hi, 0)),
          pl.BlockSpec((n_layers, None, n_rows, None, dvp), lambda s, bi, hi: (0, bi, 0, hi, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, dvp), lambda s, bi, hi: (s, bi, hi, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda s, bi, hi: (s, bi, hi, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((splits, b, hk, rows, dvp), jnp.float32),
                 jax.ShapeDtypeStruct((splits, b, hk, rows), jnp.float32)],
      compiler_params=_CompilerParams(num_warps=cfg.decode_num_warps,
                                      num_stages=cfg.decode_num_stages),
      interpret=interpret,
      name="flash_decoding",
  )(lengths.astype(jnp.int32), layer.reshape(1), q2, kc, vc)

  m = jnp.max(lse_part, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_part - m_safe[None])  # 0 for empty chunks
  tot = jnp.sum(w, axis=0)
  tot_safe = jnp.where(tot > 0, tot, 1.0)
  o = jnp.sum(w[..., None] * o_part, axis=0) / tot_safe[..., None]
  lse = jnp.where(tot > 0, m_safe + jnp.log(tot_safe), -jnp.inf)
  # [b, hk, lq*g, dv] -> [b, lq, h, dv]; lse -> [b, h, lq]
  o = o[:, :, :lq * g, :dv].reshape(b, hk, lq, g, dv).transpose(0, 2, 1, 3, 4)
  o = o.reshape(b, lq, h, dv).astype(q.dtype)
  lse = lse[:, :, :lq * g].reshape(b, hk, lq, g).transpose(0, 1, 3, 2).reshape(b, h, lq)
  return o, lse
