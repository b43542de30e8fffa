"""Flash-decoding on GPU (Pallas, Triton lowering): a few new tokens against a long KV cache.

The cache length is split into `decode_splits` chunks processed in parallel; each program
handles one (chunk, batch, kv head) and all group heads × new tokens of that kv head as the rows
of one tile (so GQA reads each k/v block once). Chunks past `lengths[b]` do no work. The
partial results (normalised output + lse per chunk) are merged with a logsumexp in XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.attention import _blocks
from ops.attention.config import AttentionBlockConfig, default_config
from ops.attention.pallas_triton import (LN2, _CompilerParams, _SUPPORTED_DTYPES, _dot,
                                         _dot_nt, _logits)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, q_len, group, window, sinks,
                   scale, soft_cap, block_kv, chunk):
  n = len_ref[()]
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
    k = k_ref[pl.ds(ks, block_kv), :]
    v = v_ref[pl.ds(ks, block_kv), :]
    s, _ = _logits(_dot_nt(q, k), scale, soft_cap)
    k_pos = ks + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    ok = (k_pos <= q_pos) & (k_pos < n)
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


def decode_attention(q, k_cache, v_cache, lengths, *, window, sinks, scale, soft_cap, return_lse,
                     interpret, config):
  """The "pallas_triton" implementation of ops.attention.decode_attention; returns (o, lse)."""
  del return_lse
  interpret = resolve_interpret(interpret, GPU)
  if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
    raise UnsupportedError(f"mixed dtypes {q.dtype}/{k_cache.dtype}/{v_cache.dtype}")
  if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  b, lq, h, d = q.shape
  max_len, hk, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
  g = h // hk
  if max(d, dv) > 256:
    raise UnsupportedError(f"head_dim {max(d, dv)} > 256")
  if lq * g > 128:
    raise UnsupportedError(f"q_len * group = {lq * g} > 128 rows per tile")
  cfg = config or default_config(d)
  if not isinstance(cfg, AttentionBlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an AttentionBlockConfig")
  bk = max(16, min(cfg.decode_block_kv, _blocks.pow2_at_least(max_len)))
  n_blocks = -(-max_len // bk)
  splits = max(1, min(cfg.decode_splits, n_blocks))
  chunk = -(-n_blocks // splits) * bk
  splits = -(-max_len // chunk)
  padded = splits * chunk
  dp, dvp = _blocks.pow2_at_least(d), _blocks.pow2_at_least(dv)
  rows = _blocks.pow2_at_least(lq * g)

  # [b, lq, hk, g, d] -> [b, hk, lq*g (token-major), d], padded to a power-of-two tile.
  q2 = q.reshape(b, lq, hk, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, lq * g, d)
  q2 = jnp.pad(q2, ((0, 0), (0, 0), (0, rows - lq * g), (0, dp - d)))
  kc = k_cache
  vc = v_cache
  if padded != max_len or dp != d:
    kc = jnp.pad(kc, ((0, 0), (0, padded - max_len), (0, 0), (0, dp - d)))
  if padded != max_len or dvp != dv:
    vc = jnp.pad(vc, ((0, 0), (0, padded - max_len), (0, 0), (0, dvp - dv)))

  kernel = functools.partial(
      _decode_kernel, q_len=lq, group=g, window=window,
      sinks=sinks if window is not None else 0, scale=scale, soft_cap=soft_cap, block_kv=bk,
      chunk=chunk)
  o_part, lse_part = pl.pallas_call(
      kernel,
      grid=(splits, b, hk),
      in_specs=[
          pl.BlockSpec((None,), lambda s, bi, hi: (bi,)),
          pl.BlockSpec((None, None, rows, dp), lambda s, bi, hi: (bi, hi, 0, 0)),
          pl.BlockSpec((None, padded, None, dp), lambda s, bi, hi: (bi, 0, hi, 0)),
          pl.BlockSpec((None, padded, None, dvp), lambda s, bi, hi: (bi, 0, hi, 0)),
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
  )(lengths.astype(jnp.int32), q2, kc, vc)

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
