"""Grouped matmul kernels in Pallas with the Triton lowering (GPU).

gmm: grid (n tiles, visits). A visit is one (m tile, group) pair from metadata.tile_visits;
  a tile that straddles a group boundary is visited once per group and its stores are
  masked to that group's rows. The program loops over k with an f32 accumulator. n tiles
  vary fastest, so the programs sharing an lhs tile (and the group's rhs) run together.
tgmm: grid (n tiles, k tiles, groups); each program loops over its group's rows.
Partial tiles in m, k and n are handled with masked loads and stores (no padding copies).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops import _backend
from ops._backend import UnsupportedError
from ops.gmm import metadata

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cdiv(a, b):
  return -(-a // b)


def _check(dtype, *dims_blocks):
  if jnp.dtype(dtype) not in _DTYPES:
    raise UnsupportedError(f"dtype {jnp.dtype(dtype)} (supports f32, bf16, f16)")
  for b in dims_blocks:
    if b < 16 or b & (b - 1):
      raise UnsupportedError(f"block size {b} must be a power of two >= 16")


def _gmm_kernel(vg_ref, vt_ref, vs_ref, ve_ref, lhs_ref, rhs_ref, out_ref, *, m, k, n, bm, bk,
                bn, num_groups, transpose_rhs):
  j = pl.program_id(0)
  v = pl.program_id(1)
  g = vg_ref[v]
  t = vt_ref[v]
  r0 = vs_ref[v]
  r1 = ve_ref[v]
  row0 = t * bm
  rows = row0 + jnp.arange(bm, dtype=jnp.int32)
  cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
  row_ok = rows < m
  col_ok = cols < n
  # The pseudo-group (rows past the sum) and unused visits run no k iterations.
  gc = jnp.minimum(g, num_groups - 1)
  active = ((g < num_groups) & (r0 < r1)).astype(jnp.int32)
  nk = active * jnp.int32(_cdiv(k, bk))

  def body(kk, acc):
    ks = kk * bk + jnp.arange(bk, dtype=jnp.int32)
    a_mask = None
    if m % bm or k % bk:
      a_mask = row_ok[:, None] & (ks < k)[None, :]
    a = plgpu.load(lhs_ref.at[pl.ds(row0, bm), pl.ds(kk * bk, bk)], mask=a_mask,
                   other=0.0 if a_mask is not None else None)
    b_mask = None
    if transpose_rhs:
      if n % bn or k % bk:
        b_mask = col_ok[:, None] & (ks < k)[None, :]
      b = plgpu.load(rhs_ref.at[gc, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)], mask=b_mask,
                     other=0.0 if b_mask is not None else None)
      b = b.T
    else:
      if n % bn or k % bk:
        b_mask = (ks < k)[:, None] & col_ok[None, :]
      b = plgpu.load(rhs_ref.at[gc, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)], mask=b_mask,
                     other=0.0 if b_mask is not None else None)
    return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
  mask = ((rows >= r0) & (rows < r1))[:, None] & col_ok[None, :]
  plgpu.store(out_ref.at[pl.ds(row0, bm), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
              mask=mask)


def gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config):
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn = config.block_m, config.block_k, config.block_n
  _check(lhs.dtype, bm, bk, bn)
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  vg, vt, vs, ve = metadata.tile_visits(group_sizes, m, bm)
  kernel = functools.partial(_gmm_kernel, m=m, k=k, n=n, bm=bm, bk=bk, bn=bn,
                             num_groups=num_groups, transpose_rhs=transpose_rhs)
  grid = (_cdiv(n, bn), metadata.num_visits(m, num_groups, bm))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="gmm_triton",
  )(vg, vt, vs, ve, lhs, rhs)


def _tgmm_kernel(gs_ref, ge_ref, lhs_ref, rhs_ref, out_ref, *, m, k, n, bm, bk, bn):
  j = pl.program_id(0)
  i = pl.program_id(1)
  g = pl.program_id(2)
  start = gs_ref[g]
  end = ge_ref[g]
  ks = i * bk + jnp.arange(bk, dtype=jnp.int32)
  cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
  k_ok = ks < k
  n_ok = cols < n

  def body(c, acc):
    r = start + c * bm
    rows = r + jnp.arange(bm, dtype=jnp.int32)
    row_ok = rows < end
    a = plgpu.load(lhs_ref.at[pl.ds(r, bm), pl.ds(i * bk, bk)],
                   mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b = plgpu.load(rhs_ref.at[pl.ds(r, bm), pl.ds(j * bn, bn)],
                   mask=row_ok[:, None] & n_ok[None, :], other=0.0)
    return acc + jnp.dot(a.T, b, preferred_element_type=jnp.float32)

  nc = _cdiv(end - start, bm)
  acc = jax.lax.fori_loop(0, nc, body, jnp.zeros((bk, bn), jnp.float32))
  mask = None
  if k % bk or n % bn:
    mask = k_ok[:, None] & n_ok[None, :]
  plgpu.store(out_ref.at[g, pl.ds(i * bk, bk), pl.ds(j * bn, bn)], acc.astype(out_ref.dtype),
              mask=mask)


def tgmm(lhs, rhs, group_sizes, *, out_dtype, interpret, config):
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  m, k = lhs.shape
  n = rhs.shape[1]
  num_groups = group_sizes.shape[0]
  bm, bk, bn = config.tgmm_block_m, config.tgmm_block_k, config.tgmm_block_n
  _check(lhs.dtype, bm, bk, bn)
  if num_groups == 0 or k == 0 or n == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  starts, ends = metadata.group_bounds(group_sizes)
  ends = jnp.minimum(ends, m)
  starts = jnp.minimum(starts, ends)
  kernel = functools.partial(_tgmm_kernel, m=m, k=k, n=n, bm=bm, bk=bk, bn=bn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(_cdiv(n, bn), _cdiv(k, bk), num_groups),
      compiler_params=plgpu.CompilerParams(num_warps=config.tgmm_num_warps,
                                           num_stages=config.tgmm_num_stages),
      interpret=interpret,
      name="tgmm_triton",
  )(starts, ends, lhs, rhs)
