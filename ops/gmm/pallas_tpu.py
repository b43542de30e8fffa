"""Grouped matmul kernels in Pallas Mosaic TPU, megablox-style.

gmm: grid (n tiles, visits, k tiles). Scalar-prefetched group metadata
(metadata.tile_visits) maps each visit to an (m tile, group) pair; the output block
follows the m tile, so consecutive visits of a tile that straddles a group boundary
keep the block resident in VMEM and each one merges its own rows into it (masked
select). Rows past sum(group_sizes) form a pseudo-group whose visits write zeros.
tgmm: grid (k tiles, n tiles, visits); a VMEM accumulator is reset on a group's first
visit and written on its last; groups with no rows are zeroed in the wrapper.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import _backend
from ops._backend import UnsupportedError
from ops.gmm import metadata

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _cdiv(a, b):
  return -(-a // b)


def _lane_block(dim: int, block: int) -> int:
  """A lane (last-dim) block: the full dim when it fits, else a multiple of 128."""
  if dim <= block:
    return dim
  if block % 128:
    raise UnsupportedError(f"lane block {block} must be a multiple of 128 (dim {dim})")
  return block


def _row_block(dim: int, block: int) -> int:
  if block % 8:
    raise UnsupportedError(f"row block {block} must be a multiple of 8")
  return min(block, _cdiv(dim, 8) * 8)


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _gmm_kernel(vg_ref, vt_ref, vs_ref, ve_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, k, bm,
                bk, num_groups, transpose_rhs):
  v = pl.program_id(1)
  kk = pl.program_id(2)
  nk = pl.num_programs(2)
  g = vg_ref[v]
  r0 = vs_ref[v]
  r1 = ve_ref[v]
  active = (g < num_groups) & (r0 < r1)

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active)
  def _():
    a = lhs_ref[...]
    b = rhs_ref[...]
    if k % bk:  # zero the contraction tail of the edge block (may hold garbage)
      ka = kk * bk + lax.broadcasted_iota(jnp.int32, a.shape, 1)
      a = jnp.where(ka < k, a, jnp.zeros((), a.dtype))
      kb = kk * bk + lax.broadcasted_iota(jnp.int32, b.shape, 1 if transpose_rhs else 0)
      b = jnp.where(kb < k, b, jnp.zeros((), b.dtype))
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

  @pl.when(kk == nk - 1)
  def _():
    rows = vt_ref[v] * bm + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    mine = (rows >= r0) & (rows < r1)
    out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config):
  interpret = _backend.resolve_interpret(interpret, _backend.TPU)
  if jnp.dtype(lhs.dtype) not in _DTYPES:
    raise UnsupportedError(f"dtype {lhs.dtype} (supports f32, bf16)")
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if m == 0 or n == 0 or k == 0:
    return jnp.zeros((m, n), out_dtype)
  bm = _row_block(m, config.block_m)
  bk = _lane_block(k, config.block_k)
  bn = _lane_block(n, config.block_n)
  vg, vt, vs, ve = metadata.tile_visits(group_sizes, m, bm)
  last_group = num_groups - 1

  def rhs_map(j, v, kk, vg, vt, vs, ve):
    g = jnp.minimum(vg[v], last_group)
    return (g, j, kk) if transpose_rhs else (g, kk, j)

  rhs_block = (None, bn, bk) if transpose_rhs else (None, bk, bn)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(_cdiv(n, bn), metadata.num_visits(m, num_groups, bm), _cdiv(k, bk)),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda j, v, kk, vg, vt, vs, ve: (vt[v], kk)),
          pl.BlockSpec(rhs_block, rhs_map),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda j, v, kk, vg, vt, vs, ve: (vt[v], j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
  )
  kernel = functools.partial(_gmm_kernel, k=k, bm=bm, bk=bk, num_groups=num_groups,
                             transpose_rhs=transpose_rhs)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=_compiler_params(("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="gmm_tpu",
  )(vg, vt, vs, ve, lhs, rhs)


def _tgmm_kernel(vg_ref, vt_ref, vs_ref, ve_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, bm,
                 num_groups):
  v = pl.program_id(2)
  nv = pl.num_programs(2)
  g = vg_ref[v]
  r0 = vs_ref[v]
  r1 = ve_ref[v]
  first = (v == 0) | (vg_ref[jnp.maximum(v - 1, 0)] != g)
  last = (v == nv - 1) | (vg_ref[jnp.minimum(v + 1, nv - 1)] != g)
  active = (g < num_groups) & (r0 < r1)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(active)
  def _():
    row0 = vt_ref[v] * bm
    a = lhs_ref[...]
    b = rhs_ref[...]
    ra = row0 + lax.broadcasted_iota(jnp.int32, a.shape, 0)
    rb = row0 + lax.broadcasted_iota(jnp.int32, b.shape, 0)
    a = jnp.where((ra >= r0) & (ra < r1), a, jnp.zeros((), a.dtype))
    b = jnp.where((rb >= r0) & (rb < r1), b, jnp.zeros((), b.dtype))
    acc_ref[...] += lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

  @pl.when(last & active)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, rhs, group_sizes, *, out_dtype, interpret, config):
  interpret = _backend.resolve_interpret(interpret, _backend.TPU)
  if jnp.dtype(lhs.dtype) not in _DTYPES:
    raise UnsupportedError(f"dtype {lhs.dtype} (supports f32, bf16)")
  m, k = lhs.shape
  n = rhs.shape[1]
  num_groups = group_sizes.shape[0]
  if num_groups == 0 or k == 0 or n == 0 or m == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  bm = _row_block(m, config.tgmm_block_m)
  bk = _lane_block(k, config.tgmm_block_k)
  bn = _lane_block(n, config.tgmm_block_n)
  vg, vt, vs, ve = metadata.tile_visits(group_sizes, m, bm)
  last_group = num_groups - 1
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(_cdiv(k, bk), _cdiv(n, bn), metadata.num_visits(m, num_groups, bm)),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, j, v, vg, vt, vs, ve: (vt[v], i)),
          pl.BlockSpec((bm, bn), lambda i, j, v, vg, vt, vs, ve: (vt[v], j)),
      ],
      out_specs=pl.BlockSpec(
          (None, bk, bn), lambda i, j, v, vg, vt, vs, ve: (jnp.minimum(vg[v], last_group), i, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, bm=bm, num_groups=num_groups),
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid_spec=grid_spec,
      compiler_params=_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="tgmm_tpu",
  )(vg, vt, vs, ve, lhs, rhs)
  # Groups with no rows are never visited: their blocks are zero by definition.
  return jnp.where((group_sizes > 0)[:, None, None], out, jnp.zeros((), out.dtype))
