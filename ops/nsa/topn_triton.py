"""Top-n block selection as a Pallas Triton kernel (GPU): the same picks as
`ops.nsa.select.select_from_scores`, without XLA's top_k + sort (26 ms at 64k tokens on an H100
for the paper's shape, more than the attention itself).

One program owns `rows` query positions of one kv head and their whole score rows
[rows, n_cols] in registers (n_cols = pow2(n_slc), read from the scores' padded width). It
builds the candidate scores exactly as select_from_scores does (forced blocks +inf, blocks that
are not allowed -inf), then takes n rounds of "largest score, lowest index among equals" (the
tie rule of lax.top_k), stopping when only -inf is left, and finally emits the chosen block
indices in ascending order with n more rounds of "smallest chosen index above the last one".
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


def _topn_kernel(p_ref, pos_ref, first_ref, out_ref, *, n, n_pad, n_slc, ls, n_first, n_local):
  p = p_ref[...]
  rows, cols = p.shape
  s = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
  cur = (pos_ref[...] // ls)[:, None]
  first = first_ref[...][:, None]
  allowed = (s <= cur) & (s >= first) & (s < n_slc)
  forced = (s < first + n_first) | (s > cur - n_local)
  score = jnp.where(allowed, jnp.where(forced, jnp.inf, p), -jnp.inf)
  chosen = jnp.zeros((rows, cols), jnp.bool_)
  for _ in range(n):
    m = jnp.max(score, axis=1)
    j = jnp.min(jnp.where(score == m[:, None], s, _BIG), axis=1)
    hit = (s == j[:, None]) & (m > -jnp.inf)[:, None]
    chosen = chosen | hit
    score = jnp.where(s == j[:, None], -jnp.inf, score)
  slot = lax.broadcasted_iota(jnp.int32, (rows, n_pad), 1)
  out = jnp.full((rows, n_pad), -1, jnp.int32)
  prev = jnp.full((rows,), -1, jnp.int32)
  for r in range(n):
    j = jnp.min(jnp.where(chosen & (s > prev[:, None]), s, _BIG), axis=1)
    out = jnp.where(slot == r, jnp.where(j == _BIG, -1, j)[:, None], out)
    prev = jnp.where(j == _BIG, _BIG, j)
  out_ref[...] = out


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
  n = cfg.n_select
  n_pad = pow2(n, 1)
  rows = max(1, min(16, tile_elems // n_cols))
  rows = 1 << (rows.bit_length() - 1)
  tr = -(-tq // rows) * rows
  pos = jnp.arange(tr, dtype=jnp.int32)
  first = (jnp.zeros((b, tr), jnp.int32) if seg_start is None else
           jnp.pad(seg_start.astype(jnp.int32) // cfg.select_len, ((0, 0), (0, tr - t))))
  if tr != tq:
    p = jnp.pad(p, ((0, 0), (0, 0), (0, tr - tq), (0, 0)))
  kern = functools.partial(_topn_kernel, n=n, n_pad=n_pad, n_slc=n_slc, ls=cfg.select_len,
                           n_first=cfg.n_always_first, n_local=cfg.n_local)
  out = pl.pallas_call(
      kern, grid=(tr // rows, hk, b),
      in_specs=[pl.BlockSpec((None, None, rows, n_cols), lambda i, j, z: (z, j, i, 0)),
                pl.BlockSpec((rows,), lambda i, j, z: (i,)),
                pl.BlockSpec((None, rows), lambda i, j, z: (z, i))],
      out_specs=pl.BlockSpec((None, None, rows, n_pad), lambda i, j, z: (z, j, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hk, tr, n_pad), jnp.int32),
      interpret=interpret, name="nsa_topn", **triton_compiler(interpret, num_warps, 1),
  )(p, pos, first)
  return out[:, :, :t, :n].transpose(0, 2, 1, 3)
