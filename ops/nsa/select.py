"""Top-n block selection from selection-block scores (shared by every implementation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.nsa.config import NSAConfig


def select_from_scores(p_slc, q_pos, cfg: NSAConfig, seg_start=None):
  """Pick n_select blocks per (query, kv head).

  p_slc [b, kvh, t, n_slc] f32 group-summed scores; q_pos [t] or [b, t] int32 query positions;
  seg_start [b, t] int32 first position of each query's segment (None = 0).
  Candidates: selection blocks s with s*l' <= pos (causally available, never a future block)
  and (s+1)*l' > seg_start (inside the query's segment). Always taken: the first
  n_always_first blocks of the segment and the n_local blocks ending with the query's own
  block. The rest by score, ties to the lower index (lax.top_k is stable). Returns block_idx
  [b, t, kvh, n_select] int32, sorted ascending with -1 padding at the end when fewer blocks
  exist. Not differentiable (scores are stop_gradient-ed).
  """
  p_slc = jax.lax.stop_gradient(p_slc).astype(jnp.float32)
  b, kvh, t, n_slc = p_slc.shape
  ls, n = cfg.select_len, cfg.n_select
  q_pos = jnp.broadcast_to(jnp.asarray(q_pos, jnp.int32).reshape(-1, t), (b, t))
  first = (jnp.zeros((b, t), jnp.int32) if seg_start is None
           else seg_start.astype(jnp.int32) // ls)
  cur = q_pos // ls
  s = jnp.arange(n_slc, dtype=jnp.int32)[None, None, None, :]
  first, cur = first[:, :, None, None], cur[:, :, None, None]
  allowed = (s <= cur) & (s >= first)
  forced = (s < first + cfg.n_always_first) | (s > cur - cfg.n_local)
  score = jnp.where(forced, jnp.inf, p_slc.transpose(0, 2, 1, 3))
  score = jnp.where(allowed, score, -jnp.inf)          # [b, t, kvh, n_slc]
  k = min(n, n_slc)
  vals, idx = jax.lax.top_k(score, k)
  idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
  if k < n:
    idx = jnp.concatenate([idx, jnp.full(idx.shape[:-1] + (n - k,), -1, jnp.int32)], -1)
  big = jnp.iinfo(jnp.int32).max
  idx = jnp.sort(jnp.where(idx < 0, big, idx), axis=-1)
  return jnp.where(idx == big, -1, idx)
