"""NSA decoding: one new token per batch row against the caches.

Reads only the compressed cache, the selected blocks (gathered) and the window slice, never
the whole raw cache. Uses the training path's selection code (select.select_from_scores) and
the same overlap mapping, so it equals `nsa` token by token (pinned by a test). XLA only: the
work per token is a few small gathers and matmuls.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops.nsa import compress
from ops.nsa.config import NSAConfig
from ops.nsa.select import select_from_scores

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def _attend(q, k, v, mask, scale):
  """q [b,kvh,g,d], k [b,kvh,n,d], v [b,kvh,n,dv], mask [b,kvh,n] -> o [b,kvh,g,dv], s, lse."""
  s = jnp.einsum("bhgd,bhnd->bhgn", q.astype(_F32), k.astype(_F32), precision=_HI) * scale
  s = jnp.where(mask[:, :, None], s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True, initial=-jnp.inf)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o = jnp.einsum("bhgn,bhnd->bhgd", p / l_safe, v.astype(_F32), precision=_HI)
  lse = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)
  return o, s, lse


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, cfg: NSAConfig,
               return_block_idx: bool = False):
  """q [b,h,d]: the new token's queries; gates [b,h,3]; lengths [b] int32 = tokens in the raw
  caches INCLUDING the new one (its position is lengths-1).
  k_cmp/v_cmp [b,max_cmp,kvh,d/dv]: compressed cache, block j valid once its last token
  j*d + l - 1 is written (the layer appends one entry every `stride` tokens);
  k_slc/v_slc, k_win/v_win [b,max_len,kvh,d/dv]: raw caches (k_win may be a ring buffer only
  if the caller maps it; here positions index it directly).
  Returns o [b,h,dv] (q.dtype) and with return_block_idx the selection [b,kvh,n] too.
  """
  b, h, d = q.shape
  hk = k_slc.shape[2]
  g = h // hk
  dv = v_slc.shape[-1]
  max_len = k_slc.shape[1]
  scale = d ** -0.5 if cfg.scale is None else cfg.scale
  lengths = jnp.asarray(lengths, jnp.int32)
  pos = lengths - 1
  qg = q.reshape(b, hk, g, d)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hk)[None, :, None]

  # compressed branch over the valid compressed entries
  n_cmp_max = k_cmp.shape[1]
  n_valid = jnp.maximum(0, (lengths - cfg.block_len) // cfg.stride + 1)
  cmask = jnp.arange(n_cmp_max)[None, None, :] < n_valid[:, None, None]
  cmask = jnp.broadcast_to(cmask, (b, hk, n_cmp_max))
  o_cmp, s_cmp, lse_cmp = _attend(qg, k_cmp.transpose(0, 2, 1, 3), v_cmp.transpose(0, 2, 1, 3),
                                  cmask, scale)
  p = jnp.where(cmask[:, :, None] & jnp.isfinite(lse_cmp), jnp.exp(s_cmp - lse_cmp), 0.0)
  p = p.sum(2)                                                           # [b, kvh, n_cmp_max]
  n_slc = cfg.n_slc(max_len)
  p_slc = compress.slc_from_cmp(p, cfg.block_len, cfg.stride, cfg.select_len, n_slc)
  idx = select_from_scores(p_slc[:, :, None, :], pos[:, None], cfg)[:, 0]    # [b, kvh, n]

  # selected branch: gather the chosen blocks only
  ls = cfg.select_len
  tok = (jnp.maximum(idx, 0)[..., None] * ls + jnp.arange(ls)).reshape(b, hk, -1)
  smask = ((idx[..., None] >= 0) & (tok.reshape(idx.shape + (ls,)) <= pos[:, None, None, None])
           ).reshape(b, hk, -1)
  tok_c = jnp.minimum(tok, max_len - 1)
  ks = k_slc[bi, tok_c, hi]                                              # [b, kvh, n*l', d]
  vs = v_slc[bi, tok_c, hi]
  o_slc, _, _ = _attend(qg, ks, vs, smask, scale)

  # window branch: the last `window` positions only
  w = min(cfg.window, k_win.shape[1])
  start = jnp.maximum(0, pos - w + 1)
  tw = start[:, None] + jnp.arange(w)[None]                              # [b, w]
  wmask = jnp.broadcast_to((tw <= pos[:, None])[:, None], (b, hk, w))
  tw_c = jnp.minimum(tw, k_win.shape[1] - 1)[:, None, :]
  kw = k_win[bi, tw_c, hi]
  vw = v_win[bi, tw_c, hi]
  o_win, _, _ = _attend(qg, kw, vw, wmask, scale)

  gt = gates.astype(_F32).reshape(b, hk, g, 3)
  o = gt[..., 0:1] * o_cmp + gt[..., 1:2] * o_slc + gt[..., 2:3] * o_win
  o = o.reshape(b, h, dv).astype(q.dtype)
  return (o, idx) if return_block_idx else o
