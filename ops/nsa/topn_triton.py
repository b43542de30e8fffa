"""Top-n block selection as a Pallas Triton kernel (GPU): the same picks as
`ops.nsa.select.select_from_scores`, without XLA's top_k + sort (26 ms at 64k tokens on an H100
for the paper's shape, more than the attention itself).

One program owns `rows` query positions of one kv head and their whole score rows
[rows, n_cols] in registers (n_cols = pow2(n_slc), read from the scores' padded width). It
builds the candidate scores exactly as select_from_scores does (forced blocks +inf, blocks that
are not allowed -inf), then takes n rounds of "largest score, lowest index among equals" (the
tie rule of lax.top_k), each round two row reductions; a round that finds only -inf picks
nothing. The n picks (one [rows] vector each) are put in ascending order by a static sorting
network on those vectors, not by n more full-width reductions (which took a third of the time).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops.nsa.config import NSAConfig
from ops.nsa.kernel_common import pow2, triton_compiler

_BIG = 2 ** 30


def sorting_network(n: int) -> list[tuple[int, int]]:
  """Compare-exchange pairs (i, j), i < j, of Batcher's odd-even merge sort for n elements (n a
  power of two): applying them in order sorts any n values ascending."""
  pairs = []

  def merge(lo, m, r):
    step = r * 2
    if step < m:
      merge(lo, m, step)
      merge(lo + r, m, step)
      pairs.extend((i, i + r) for i in range(lo + r, lo + m - r, step))
    else:
      pairs.append((lo, lo + r))

  def sort(lo, m):
    if m > 1:
      sort(lo, m // 2)
      sort(lo + m // 2, m // 2)
      merge(lo, m, 1)

  sort(0, n)
  return pairs


def candidate_scores(p, s, cur, first, n_slc: int, cfg: NSAConfig):
  """Scores as select_from_scores ranks them: forced blocks +inf, blocks that are not allowed
  -inf. p, s (block index): [..., cols]; cur, first: query block and segment's first block,
  broadcastable to p."""
  allowed = (s <= cur) & (s >= first) & (s < n_slc)
  forced = (s < first + cfg.n_always_first) | (s > cur - cfg.n_local)
  return jnp.where(allowed, jnp.where(forced, jnp.inf, p), -jnp.inf)


def top_n_sorted(score, s, n: int, n_pad: int):
  """n rounds of (largest score, lowest index among equals: the tie rule of lax.top_k) over
  the last axis, then ascending order by a sorting network. score, s: [..., cols] -> [...,
  n_pad] int32, -1 for empty slots (a round that finds only -inf picks nothing)."""
  picks = []
  for _ in range(n):
    m = jnp.max(score, axis=-1)
    j = jnp.min(jnp.where(score == m[..., None], s, _BIG), axis=-1)
    j = jnp.where(m > -jnp.inf, j, _BIG)
    picks.append(j)
    score = jnp.where(s == j[..., None], -jnp.inf, score)
  picks += [jnp.full(picks[0].shape, _BIG, jnp.int32)] * (n_pad - n)
  for a, b in sorting_network(n_pad):
    lo, hi = jnp.minimum(picks[a], picks[b]), jnp.maximum(picks[a], picks[b])
    picks[a], picks[b] = lo, hi
  shape = picks[0].shape + (n_pad,)
  slot = lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
  out = jnp.full(shape, -1, jnp.int32)
  for r in range(n):
    out = jnp.where(slot == r, jnp.where(picks[r] == _BIG, -1, picks[r])[..., None], out)
  return out


def _topn_kernel(p_ref, pos_ref, first_ref, out_ref, *, cfg, n_pad, n_slc, ls):
  p = p_ref[...]
  rows, cols = p.shape
  s = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  score = candidate_scores(p, s, (pos_ref[...] // ls)[:, None], first_ref[...][:, None], n_slc,
                           cfg)
  out_ref[...] = top_n_sorted(score, s, cfg.n_select, n_pad)


def topn_from_padded_scores(p, t, cfg: NSAConfig, seg_start=None, *, tile_elems: int,
                            num_warps: int, interpret: bool):
  """p [b, kvh, tq, width] f32 group-summed scores (tq >= t rows; width a multiple of
  pow2(n_slc); columns past n_slc are ignored); seg_start [b, t] int32 or None.
  Returns block_idx [b, t, kvh, n_select] int32, equal to select_from_scores."""
  b, hk, tq, width = p.shape
  n_slc = cfg.n_slc(t)
  n_cols = pow2(n_slc, 1)               # columns read: one power-of-two block from column 0
  if width % n_cols:
    raise ValueError(f"score width {width} must be a multiple of pow2(n_slc) = {n_cols}")
  n_pad = pow2(cfg.n_select, 1)
  rows = max(1, min(16, tile_elems // n_cols))
  rows = 1 << (rows.bit_length() - 1)
  tr = -(-tq // rows) * rows
  pos = jnp.arange(tr, dtype=jnp.int32)
  first = (jnp.zeros((b, tr), jnp.int32) if seg_start is None else
           jnp.pad(seg_start.astype(jnp.int32) // cfg.select_len, ((0, 0), (0, tr - t))))
  if tr != tq:
    p = jnp.pad(p, ((0, 0), (0, 0), (0, tr - tq), (0, 0)))
  kern = functools.partial(_topn_kernel, cfg=cfg, n_pad=n_pad, n_slc=n_slc, ls=cfg.select_len)
  out = pl.pallas_call(
      kern, grid=(tr // rows, hk, b),
      in_specs=[pl.BlockSpec((None, None, rows, n_cols), lambda i, j, z: (z, j, i, 0)),
                pl.BlockSpec((rows,), lambda i, j, z: (i,)),
                pl.BlockSpec((None, rows), lambda i, j, z: (z, i))],
      out_specs=pl.BlockSpec((None, None, rows, n_pad), lambda i, j, z: (z, j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hk, tr, n_pad), jnp.int32),
      interpret=interpret, name="nsa_topn", **triton_compiler(interpret, num_warps, 1),
  )(p, pos, first)
  return out[:, :, :t, :cfg.n_select].transpose(0, 2, 1, 3)
