"""Static geometry and XLA-side index maps of the TPU selected-attention kernels.

`_Geom` fixes the tiling of one call (query tiles of tpu_block_q positions, union slots per
tile, tiles per call under the scalar-prefetch budget); `_layout` puts q / k / v / block_idx /
segments into the kernels' [b, kv head, ...] layout; `_unions` builds each query tile's sorted
unique selected blocks (what the forward and dq grids visit) and `_pairs` the (block, tile)
pairs sorted by block (what the dk / dv grid visits). See ops/nsa/tpu_selected.py.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ops.nsa.tpu_common import _pad_axis


class _Geom:
  """Static geometry of one selected-attention call."""

  def __init__(self, q, k, v, block_idx, ls, bq, budget):
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    n = block_idx.shape[-1]
    self.b, self.t, self.h, self.d, self.hk, self.dv, self.n = b, t, h, d, hk, dv, n
    self.g = h // hk
    self.ls, self.bq = ls, bq
    self.nblk = -(-t // ls)
    self.tk = self.nblk * ls
    self.u = max(1, min(bq * n, self.nblk))        # union slots per query tile
    nt = -(-t // bq)
    self.ct = max(1, min(nt, budget // max(1, b * hk * self.u)))   # tiles per call
    self.nch = -(-nt // self.ct)
    self.nt = self.nch * self.ct
    self.tq = self.nt * bq


def _layout(q, k, v, block_idx, qseg, geo: _Geom):
  """q -> [b,hk,g,tq,d]; k/v -> [b,hk,tk,*]; idx -> [b,hk,tq,n]; segments (or None)."""
  b, t, hk, g = geo.b, geo.t, geo.hk, geo.g
  q5 = _pad_axis(q.reshape(b, t, hk, g, geo.d).transpose(0, 2, 3, 1, 4), 3, geo.tq)
  k4 = _pad_axis(k.transpose(0, 2, 1, 3), 2, geo.tk)
  v4 = _pad_axis(v.transpose(0, 2, 1, 3), 2, geo.tk)
  idx = _pad_axis(block_idx.astype(jnp.int32).transpose(0, 2, 1, 3), 2, geo.tq, -1)
  segs = None
  if qseg is not None:
    qs = _pad_axis(qseg.astype(jnp.int32), 1, geo.tq, -1)[:, :, None]
    ks = _pad_axis(qseg.astype(jnp.int32), 1, geo.tk, -2).reshape(b, geo.nblk, geo.ls)
    segs = (qs, ks)
  return q5, k4, v4, idx, segs


def _unions(idx, geo: _Geom):
  """Per query tile: sorted unique selected blocks [b,hk,nt,U] (tail repeats the last) and
  their count [b,hk,nt]."""
  b, hk = geo.b, geo.hk
  ids = jnp.sort(idx.reshape(b, hk, geo.nt, geo.bq * geo.n), axis=-1)
  prev = jnp.concatenate([jnp.full(ids.shape[:-1] + (1,), -1, jnp.int32), ids[..., :-1]], -1)
  new = (ids >= 0) & (ids != prev)
  big = jnp.iinfo(jnp.int32).max
  u = jnp.sort(jnp.where(new, ids, big), axis=-1)[..., :geo.u]
  cnt = jnp.sum(new, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(u, jnp.maximum(cnt - 1, 0)[..., None], -1)
  last = jnp.where(cnt[..., None] > 0, last, 0)
  u = jnp.where(jnp.arange(geo.u, dtype=jnp.int32) < cnt[..., None], u, last)
  return u.astype(jnp.int32), cnt


def _pairs(u, cnt, geo: _Geom):
  """(block, tile) pairs of each chunk's unions sorted by block: blocks / local tiles
  [b,hk,nch,ct*U] (invalid tail repeats the last valid pair) and the valid count [b,hk,nch]."""
  b, hk, nch, ct, nu = geo.b, geo.hk, geo.nch, geo.ct, geo.u
  valid = jnp.arange(nu, dtype=jnp.int32) < cnt[..., None]              # [b,hk,nt,U]
  key = jnp.where(valid, u, geo.nblk).reshape(b, hk, nch, ct * nu)
  tile = jnp.broadcast_to(jnp.arange(ct, dtype=jnp.int32)[:, None], (ct, nu)).reshape(ct * nu)
  tile = jnp.broadcast_to(tile, key.shape)
  sk, st = lax.sort((key, tile), dimension=3, is_stable=True, num_keys=1)
  nval = jnp.sum(valid.reshape(b, hk, nch, ct * nu), -1).astype(jnp.int32)
  j = jnp.arange(ct * nu, dtype=jnp.int32)
  lastk = jnp.take_along_axis(sk, jnp.maximum(nval - 1, 0)[..., None], -1)
  lastt = jnp.take_along_axis(st, jnp.maximum(nval - 1, 0)[..., None], -1)
  ok = j < nval[..., None]
  sk = jnp.where(ok, sk, jnp.where(nval[..., None] > 0, lastk, 0))
  st = jnp.where(ok, st, jnp.where(nval[..., None] > 0, lastt, 0))
  return sk.astype(jnp.int32), st.astype(jnp.int32), nval

