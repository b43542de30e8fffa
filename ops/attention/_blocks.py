"""Block-range arithmetic and in-block masks shared by the Pallas attention kernels.

All functions work on traced int32 scalars inside kernels (Triton and Mosaic lowering) and
only use max/min/where/integer division of non-negative values.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Mask:
  """Static masking description of one attention call (true, unpadded lengths)."""
  causal: bool
  window: int | None
  sinks: int
  q_offset: int
  q_len: int
  kv_len: int
  has_segments: bool
  has_valid: bool


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _fdiv(a, b: int):
  """floor(a / b) for a >= 0 (clamped)."""
  return lax.div(jnp.maximum(_i32(a), 0), _i32(b))


def _cdiv(a, b: int):
  return lax.div(jnp.maximum(_i32(a), 0) + (b - 1), _i32(b))


def _clamp(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_ranges(mask: Mask, q_start, block_q: int, block_kv: int):
  """kv-block ranges a q block [q_start, q_start+block_q) must visit.

  Returns [(start, end, masked)] with traced starts/ends (block indices): positional masking
  is needed only where `masked` is True (segments/kv_valid are applied everywhere).
  """
  nk = -(-mask.kv_len // block_kv)
  p0 = _i32(q_start) + mask.q_offset
  p1 = p0 + (block_q - 1)
  hi = jnp.minimum(_cdiv(p1 + 1, block_kv), nk) if mask.causal else _i32(nk)
  if mask.window is not None:
    lo = jnp.minimum(_fdiv(p0 - mask.window + 1, block_kv), hi)
    full_lo = _cdiv(p1 - mask.window + 1, block_kv)
  else:
    lo = _i32(0)
    full_lo = _i32(0)
  full_hi = _fdiv(p0 + 1, block_kv) if mask.causal else _i32(nk)
  full_hi = jnp.minimum(full_hi, mask.kv_len // block_kv)
  f0 = _clamp(full_lo, lo, hi)
  f1 = _clamp(full_hi, f0, hi)
  ranges = []
  if mask.window is not None and mask.sinks > 0:
    ranges.append((_i32(0), jnp.minimum(_i32(-(-mask.sinks // block_kv)), lo), True))
  ranges += [(lo, f0, True), (f0, f1, False), (f1, hi, True)]
  return ranges


def q_ranges(mask: Mask, kv_start, block_q: int, block_kv: int):
  """q-block ranges a kv block [kv_start, kv_start+block_kv) receives gradient from."""
  nq = -(-mask.q_len // block_q)
  ks = _i32(kv_start)
  off = mask.q_offset
  lo = jnp.minimum(_fdiv(ks - off, block_q), nq) if mask.causal else _i32(0)
  full_lo = _cdiv(ks + block_kv - 1 - off, block_q) if mask.causal else _i32(0)
  if mask.window is not None:
    i_max = ks + block_kv + mask.window - 2 - off  # last row seeing the block's last key
    hi = jnp.where(i_max < 0, 0, jnp.minimum(_fdiv(i_max, block_q) + 1, nq))
    if mask.sinks > 0:
      hi = jnp.where(ks < mask.sinks, nq, hi)
    val = ks + mask.window - off - block_q
    full_hi = jnp.where(val < 0, 0, _fdiv(val, block_q) + 1)
  else:
    hi = _i32(nq)
    full_hi = _i32(nq)
  hi = jnp.maximum(hi, lo)
  f0 = _clamp(full_lo, lo, hi)
  f1 = _clamp(full_hi, f0, hi)
  return [(lo, f0, True), (f0, f1, False), (f1, hi, True)]


def positional_mask(mask: Mask, q_pos, k_pos):
  """Visibility of keys at k_pos for queries at q_pos (broadcasting int32 arrays)."""
  ok = k_pos < mask.kv_len
  if mask.causal:
    ok = ok & (k_pos <= q_pos)
  if mask.window is not None:
    in_w = k_pos > q_pos - mask.window
    if mask.sinks > 0:
      in_w = in_w | (k_pos < mask.sinks)
    ok = ok & in_w
  return ok


def pad_len(n: int, block: int) -> int:
  return -(-n // block) * block


def bwd_delta(o, do, dlse):
  """The row term of every flash backward, dS = P * (dP - delta): o, do [b, lq, h, dv],
  dlse [b, h, lq] (cotangent of the returned lse) -> rowsum(dO * O) - dlse [b, h, lq] f32."""
  return jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse


def pow2_at_least(n: int, floor: int = 16) -> int:
  p = floor
  while p < n:
    p *= 2
  return p


def block_visible(mask: Mask, q_start, kv_start, block_q: int, block_kv: int):
  """Whether any key of kv block [kv_start, +block_kv) is visible to q block [q_start, +block_q)."""
  p0 = q_start + mask.q_offset
  p1 = p0 + block_q - 1
  ok = kv_start < mask.kv_len
  if mask.causal:
    ok = ok & (kv_start <= p1)
  if mask.window is not None:
    in_w = kv_start + block_kv - 1 > p0 - mask.window
    if mask.sinks > 0:
      in_w = in_w | (kv_start < mask.sinks)
    ok = ok & in_w
  return ok


def block_full(mask: Mask, q_start, kv_start, block_q: int, block_kv: int):
  """Whether every key of the kv block is positionally visible to every query of the q block."""
  p0 = q_start + mask.q_offset
  p1 = p0 + block_q - 1
  ok = kv_start + block_kv <= mask.kv_len
  if mask.causal:
    ok = ok & (kv_start + block_kv - 1 <= p0)
  if mask.window is not None:
    ok = ok & (kv_start > p1 - mask.window)
  return ok
