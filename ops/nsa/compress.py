"""Block geometry of NSA: unfolding compression blocks, their visibility, and the
compression -> selection score mapping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def unfold_blocks(x, block_len: int, stride: int):
  """x [b, t, kvh, d] -> [b, n_cmp, block_len, kvh, d], block j = tokens [j*stride, j*stride+l).

  n_cmp = max(0, (t - block_len) // stride + 1): only FULL blocks (a partial block at the end
  would summarise tokens a query may not see yet in a later step of decoding).
  """
  b, t = x.shape[:2]
  n = max(0, (t - block_len) // stride + 1)
  idx = (np.arange(n)[:, None] * stride + np.arange(block_len)[None, :]).astype(np.int32)
  return jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=1).reshape(
      (b, n, block_len) + x.shape[2:])


def block_segments(segment_ids, n_cmp: int, block_len: int, stride: int):
  """Segment id of each compression block, -1 if it straddles a segment boundary.

  segment_ids [b, t] (contiguous segments) -> [b, n_cmp] int32.
  """
  starts = np.arange(n_cmp, dtype=np.int32) * stride
  first = jnp.take(segment_ids, jnp.asarray(starts), axis=1)
  last = jnp.take(segment_ids, jnp.asarray(starts + block_len - 1), axis=1)
  return jnp.where(first == last, first, -1).astype(jnp.int32)


def cmp_visible(q_pos, n_cmp: int, block_len: int, stride: int, q_segment_ids=None,
                cmp_segment_ids=None):
  """Visibility of compressed key j to the query at q_pos: the block ends at or before it.

  q_pos [..., q] int32 -> bool [..., q, n_cmp]: j*stride + block_len - 1 <= q_pos (the whole
  block is in the past; the inverted mask of some public versions leaks the future), and with
  segments the block lies inside the query's segment.
  """
  ends = jnp.arange(n_cmp, dtype=jnp.int32) * stride + block_len - 1
  vis = ends <= q_pos[..., None]
  if q_segment_ids is not None:
    vis = vis & (cmp_segment_ids[..., None, :] == q_segment_ids[..., :, None])
  return vis


def overlap_matrix(n_cmp: int, n_slc: int, block_len: int, stride: int, select_len: int):
  """W [n_cmp, n_slc]: the share of compression block j inside selection block s.

  W[j, s] = |[j*d, j*d + l) ∩ [s*l', (s+1)*l')| / l. A block inside one selection block gives
  it weight 1, a block straddling two splits its probability by overlap.
  """
  j0 = np.arange(n_cmp)[:, None] * stride
  s0 = np.arange(n_slc)[None, :] * select_len
  ov = np.minimum(j0 + block_len, s0 + select_len) - np.maximum(j0, s0)
  return (np.maximum(ov, 0) / block_len).astype(np.float32)


# The paper writes p_slc[j] = Σ_{m<l'/d} Σ_{n<l/d} p_cmp[(l'/d)·j − m − n]. With l and l'
# multiples of d, split tokens into sub-blocks of d: compression block i covers sub-blocks
# i..i+l/d-1 and selection block j covers sub-blocks (l'/d)j .. (l'/d)j + l'/d - 1. The blocks
# overlapping selection block j are therefore i = (l'/d)j + m − n (m < l'/d, n < l/d), each
# counted once per shared sub-block — the overlap weighting above times l/d. The paper's
# "− m" reading instead sums blocks i ∈ [(l'/d)(j−1) − l/d + 2, (l'/d)j]: it credits block j
# with compression blocks that mostly cover the PREVIOUS selection block (off by l'/d − 1
# sub-blocks), which is why we implement the overlap reading: a selection block is scored by
# the attention paid to the compression blocks that actually contain its tokens.
def slc_from_cmp(p_cmp, block_len: int, stride: int, select_len: int, n_slc: int):
  """Overlap-weighted mapping by shifted sums: p_cmp [..., n_cmp] -> p_slc [..., n_slc].

  Equals p_cmp @ overlap_matrix(...) (pinned by a test) without the dense matrix.
  """
  n_cmp = p_cmp.shape[-1]
  r = block_len // stride
  per = select_len // stride
  n_sub = n_slc * per
  w = stride / block_len
  sub = jnp.zeros(p_cmp.shape[:-1] + (n_sub,), jnp.float32)
  pf = p_cmp.astype(jnp.float32) * w
  for n in range(r):  # compression block i feeds sub-blocks i .. i+r-1
    lo, hi = n, min(n + n_cmp, n_sub)
    if hi > lo:
      sub = sub.at[..., lo:hi].add(pf[..., :hi - lo])
  return sub.reshape(p_cmp.shape[:-1] + (n_slc, per)).sum(-1)


def segment_starts(segment_ids):
  """Start position of each token's segment: [b, t] -> [b, t] int32 (segments contiguous)."""
  t = segment_ids.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                         segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(new, pos[None], 0), axis=1)


def compressed_attention_flash(q, k_cmp, v_cmp, *, block_len, stride, q_segment_ids=None,
                               scale=None, implementation=None, interpret=None):
  """Compressed branch through ops.attention's flash kernels (differentiable, with lse).

  Without segments the queries are packed: query t sees compressed keys j <= (t-l+1)//d, so
  the d queries t = l-1 + i*d + r (r < d) share the visible prefix of group i. They are moved
  into the head axis (GQA group d*g) and group i attends causally with q_offset 0: exactly the
  n_cmp x n_cmp causal problem, n_cmp = ceil((t-l+1)/d). With segments a packed row would mix
  segments, so compressed key j is instead scattered to position j*d + l - 1 (the block's last
  token) of a length-t key array with kv_valid marking real keys, and plain causal attention
  with segment ids gives the same visibility (d times more work; correct for packed data).
  Returns (o [b,t,h,dv], lse [b,h,t] f32).
  """
  from ops.attention import attention
  b, t, h, d = q.shape
  n_cmp, hk, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
  g = h // hk
  scale = d ** -0.5 if scale is None else scale
  if n_cmp == 0:
    return (jnp.zeros((b, t, h, dv), q.dtype), jnp.full((b, h, t), -jnp.inf, jnp.float32))
  if q_segment_ids is not None:
    cseg = block_segments(q_segment_ids, n_cmp, block_len, stride)
    pos = np.arange(n_cmp) * stride + block_len - 1
    k_exp = jnp.zeros((b, t, hk, d), k_cmp.dtype).at[:, pos].set(k_cmp)
    v_exp = jnp.zeros((b, t, hk, dv), v_cmp.dtype).at[:, pos].set(v_cmp)
    valid = jnp.zeros((b, t), bool).at[:, pos].set(cseg >= 0)
    o, lse = attention(q, k_exp, v_exp, causal=True, q_segment_ids=q_segment_ids,
                       kv_segment_ids=q_segment_ids, kv_valid=valid, scale=scale,
                       return_lse=True, implementation=implementation, interpret=interpret)
    return o, lse
  t1 = t - block_len + 1            # queries with at least one visible block
  ng = -(-t1 // stride)             # == n_cmp
  qs = q[:, block_len - 1:]
  qs = jnp.pad(qs, ((0, 0), (0, ng * stride - t1), (0, 0), (0, 0)))
  qs = qs.reshape(b, ng, stride, hk, g, d).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, ng, hk * stride * g, d)
  o, lse = attention(qs, k_cmp[:, :ng], v_cmp[:, :ng], causal=True, q_offset=0, scale=scale,
                     return_lse=True, implementation=implementation, interpret=interpret)
  o = o.reshape(b, ng, hk, stride, g, dv).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, ng * stride, h, dv)[:, :t1]
  o = jnp.pad(o, ((0, 0), (block_len - 1, 0), (0, 0), (0, 0)))
  lse = lse.reshape(b, hk, stride, g, ng).transpose(0, 1, 3, 4, 2).reshape(b, h, ng * stride)
  lse = jnp.pad(lse[:, :, :t1], ((0, 0), (0, 0), (block_len - 1, 0)),
                constant_values=-jnp.inf)
  return o, lse
