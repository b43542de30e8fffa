"""Grouped matmul in Pallas Mosaic GPU (Hopper: TMA loads into swizzled shared memory, wgmma).

gmm (the forward product and the d lhs product, transpose_rhs=True) and tgmm (the d rhs
product, at the end of the file).

The kernel is persistent: one CTA per SM walks the (visit, n tile) pairs of
metadata.tile_visits. A visit is one (m tile, group) pair; its K loop is an emit_pipeline of
TMA copies (lhs rows of the tile, the group's rhs block) into `stages` shared-memory slots
feeding one warpgroup's wgmma. The accumulator goes out through shared memory with TMA
stores, which finish under the next tile's main loop (waited for before the buffer is
rewritten). A tile that straddles group boundaries is visited once per group, and each visit
stores only its group's rows: TMA boxes have static shapes, so the row range is written as
a ladder of power-of-two boxes (at most log2(block_m) + 1 stores).

Partial tiles: rows past m are TMA zero-fills (loads) and clipped (stores); k must be a
multiple of block_k and n of block_n (else UnsupportedError and dispatch moves on): Mosaic GPU
refuses TMA descriptors over a ragged k, and the last column tile's clipped store is not
emulated by interpret mode, so it would go untested on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import _backend
from ops._backend import UnsupportedError
from ops._mosaic_gpu import fit_stages, require_hopper, warpgroup_kernel
from ops.gmm import metadata

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _num_ctas(interpret: bool) -> int:
  """One CTA per SM (persistent kernel); a few in interpret mode."""
  if interpret:
    return 4
  return getattr(jax.local_devices()[0], "core_count", None) or 132


def _swizzled(cols: int, dtype) -> tuple:
  """Shared-memory transforms for a tile whose rows hold `cols` elements of dtype."""
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _splits_rows(config) -> bool:
  """Whether the compute warpgroups split the CTA tile's rows (mgpu_split_m; needs two)."""
  return bool(config.mgpu_split_m) and config.mgpu_compute_wgs > 1


def _resolve_tiles(config, n, in_itemsize, out_itemsize):
  """(bm, bn, bk, stages, wgs) for this n: block_n halves (down to 128-byte rows) until the
  CTA's wgs x block_n columns divide n; stages 0 = as many as fit in shared memory next to
  the output buffers (2..8). H200, session 9: these give 128 x (2 x 64) on 6 stages for
  n = 1408 and 128 x (2 x 128) on 3 stages for n = 2048 / 5632, the best of the sweep."""
  bm, bn, bk = config.mgpu_block_m, config.mgpu_block_n, config.mgpu_block_k
  wgs = config.mgpu_compute_wgs
  split_m = _splits_rows(config)
  cta_m, n_wgs = (wgs * bm, 1) if split_m else (bm, wgs)   # warpgroups along rows / columns
  while n % (n_wgs * bn) and bn % 2 == 0 and (bn // 2 * in_itemsize) % 128 == 0:
    bn //= 2
  what = (f"gmm tile ({wgs} x {bm}) x {bn} x {bk}" if split_m
          else f"gmm tile {bm} x ({wgs} x {bn}) x {bk}")
  stages = fit_stages(config.mgpu_stages, (cta_m * bk + bk * n_wgs * bn) * in_itemsize,
                      wgs * bm * bn * out_itemsize, what)
  return bm, bn, bk, stages, wgs


def _check(lhs, rhs, n, bm, bn, bk, out_dtype):
  dtype = jnp.dtype(lhs.dtype)
  if dtype not in _DTYPES or jnp.dtype(rhs.dtype) != dtype:
    raise UnsupportedError(f"dtypes {lhs.dtype}/{rhs.dtype} (Mosaic GPU gmm: bf16 or f16)")
  if jnp.dtype(out_dtype) not in _DTYPES + (jnp.dtype(jnp.float32),):
    raise UnsupportedError(f"output dtype {out_dtype}")
  if bm % 64:
    raise UnsupportedError(f"mgpu_block_m {bm} must be a multiple of 64 (one warpgroup's rows)")
  # Tiles whose rows are whole 128-byte swizzle spans; narrower ones (32/64-byte swizzles, as
  # block_n 16 or 176 give) failed Mosaic GPU's layout inference under jax 0.11.2.
  if bk * dtype.itemsize != 128 or (bn * dtype.itemsize) % 128 or bn > 256:
    raise UnsupportedError(f"mgpu tiles k={bk} n={bn}: need k * itemsize == 128 bytes and "
                           "n * itemsize a multiple of 128 bytes, n <= 256")
  if n % bn:
    raise UnsupportedError(f"n={n} is not a multiple of mgpu_block_n={bn}")
  m, k = lhs.shape
  if m % 8 and m > 8:
    # the lhs TMA descriptor is tiled by 8 rows (compile-time refusal under jax 0.11.2)
    raise UnsupportedError(f"m={m} rows is not a multiple of 8")
  if k % bk:
    # TMA descriptors over a k that is not a multiple of the tile are refused at compile time
    # (jax 0.11.2); interpret mode would accept them, so the check is here for both
    raise UnsupportedError(f"k={k} is not a multiple of mgpu_block_k={bk}")
  row_bytes = [k * dtype.itemsize, n * dtype.itemsize, n * jnp.dtype(out_dtype).itemsize]
  if any(b % 16 for b in row_bytes):
    raise UnsupportedError(f"TMA needs 16-byte row strides: k={k}, n={n}")


def _visit(visits_gmem, info, n_tiles):
  """The persistent loop's step -> (group, row tile, row range [r0, r1), column tile j)."""
  (lin,) = info.index
  v, j = lin // n_tiles, lin % n_tiles
  return visits_gmem[v, 0], visits_gmem[v, 1], visits_gmem[v, 2], visits_gmem[v, 3], j


def _store_rows(acc, o_smem, out_gmem, row0, r0, r1, cols):
  """acc [bm, bn] f32 -> out_gmem rows [r0, r1) (inside the tile starting at row0), columns
  `cols`, through o_smem [bm, bn] (untiled). TMA boxes are static: the row range goes out as
  a ladder of power-of-two boxes, largest first."""
  bm = o_smem.shape[0]
  # the previous tile's stores must have read o_smem; they ran under this tile's main loop
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  o_smem[...] = acc.astype(o_smem.dtype)
  plgpu.commit_smem()
  start = r0 - row0
  size = r1 - r0
  rows = 1 << (bm.bit_length() - 1)     # size < 2 * rows: its bits from here down
  while rows >= 1:
    @pl.when((size & rows) != 0)
    def _():
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, rows)],
                              out_gmem.at[pl.ds(row0 + start, rows), cols])
    start = start + (size & rows)
    rows //= 2


def gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config):
  """lhs [m, k] (rows sorted by group), rhs [g, k, n] ([g, n, k] when transpose_rhs),
  group_sizes [g] -> [m, n]; rows past sum(group_sizes) are zero."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bn, bk, stages, wgs = _resolve_tiles(config, n, jnp.dtype(lhs.dtype).itemsize,
                                           jnp.dtype(out_dtype).itemsize)
  _check(lhs, rhs, n, bm, bn, bk, out_dtype)
  require_hopper(interpret)
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  if interpret and transpose_rhs:
    # interpret mode cannot run wgmma on a transposed shared-memory view: same product
    rhs, transpose_rhs = jnp.swapaxes(rhs, 1, 2), False
  split_m = _splits_rows(config)
  cta_m = wgs * bm if split_m else bm
  visits = jnp.stack(metadata.tile_visits(group_sizes, m, cta_m), axis=1)   # [V, 4]
  if wgs > 1:
    chain_stages = _chain_stages(stages, k // bk) if config.mgpu_chain_tiles else 0
    return _gmm_warp_specialized(visits, lhs, rhs, out_dtype=out_dtype, n=n,
                                 transpose_rhs=transpose_rhs, interpret=interpret,
                                 tiles=(bm, bn, bk, chain_stages or stages, wgs),
                                 split_m=split_m, chain=bool(chain_stages))
  num_visits = visits.shape[0]
  n_tiles = n // bn
  k_steps = k // bk
  lhs_transforms = _swizzled(bk, lhs.dtype)
  rhs_transforms = _swizzled(bk if transpose_rhs else bn, rhs.dtype)   # its tile's row length

  def rhs_spec(j):
    if transpose_rhs:
      return plgpu.BlockSpec((bn, bk), lambda kk: (j, kk), transforms=rhs_transforms,
                             delay_release=1)
    return plgpu.BlockSpec((bk, bn), lambda kk: (kk, j), transforms=rhs_transforms,
                           delay_release=1)

  def body(visits_gmem, lhs_gmem, rhs_gmem, out_gmem):
    # untiled (the store ladder slices single rows, below the 8-row tiles of a swizzle) and
    # allocated around the loop, so no later scope reuses it while a TMA store reads it
    pl.run_scoped(functools.partial(tiles, visits_gmem, lhs_gmem, rhs_gmem, out_gmem),
                  plgpu.SMEM((bm, bn), out_dtype))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def tiles(visits_gmem, lhs_gmem, rhs_gmem, out_gmem, o_smem):
    @plgpu.nd_loop((num_visits * n_tiles,), collective_axes="sm")
    def _visit_tile(info):
      g, tile, r0, r1, j = _visit(visits_gmem, info, n_tiles)

      @pl.when(r0 < r1)
      def _():
        def accumulate(acc_ref):
          @pl.when(g < num_groups)     # the rows past the sum (pseudo-group) stay zero
          def _():
            def step(_, a_smem, b_smem):
              b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_rhs else b_smem
              plgpu.wgmma(acc_ref, a_smem, b)

            plgpu.emit_pipeline(
                step, grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((bm, bk), lambda kk: (tile, kk), transforms=lhs_transforms,
                                    delay_release=1),
                    rhs_spec(j),
                ],
                max_concurrent_steps=stages,
            )(lhs_gmem, rhs_gmem.at[jnp.minimum(g, num_groups - 1)])
          return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((bm, bn)))
        _store_rows(acc, o_smem, out_gmem, tile * bm, r0, r1, pl.ds(j * bn, bn))

  kernel = warpgroup_kernel(body, jax.ShapeDtypeStruct((m, n), out_dtype),
                            grid=(_num_ctas(interpret),), grid_names=("sm",),
                            interpret=interpret, zero_fill_oob=True)
  return kernel(visits, lhs, rhs)



def _chain_stages(stages: int, k_steps: int) -> int:
  """Pipeline depth for chained tiles (mgpu_chain_tiles): Pallas chains pipelines only when
  the depth divides the steps, so the largest depth <= stages that divides k_steps; 0 = none
  (>= 2) does, the tiles then run unchained."""
  return next((s for s in range(min(stages, k_steps), 1, -1) if k_steps % s == 0), 0)


def _gmm_warp_specialized(visits, lhs, rhs, *, out_dtype, n, transpose_rhs, interpret, tiles,
                          split_m=False, chain=False):
  """The same visits with wgs compute warpgroups, each owning block_n of a CTA tile of
  block_m x (wgs * block_n) (split_m: block_m rows of a (wgs * block_m) x block_n tile), and
  one warpgroup issuing the TMA loads.

  chain (mgpu_chain_tiles): each CTA's tiles run as one pipeline of pipelines (Pallas'
  pipeline_state START / STEADY / STOP): the load warpgroup fetches the next tile's first
  k steps while the compute warpgroups finish and store the current one, instead of every
  tile filling its pipeline from empty. Only the visits with rows of a real group take part
  (they come first in the visit table), then a second loop writes the zero rows past the
  groups' sum."""
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  bm, bn, bk, stages, wgs = tiles
  cta_m, cta_n = (wgs * bm, bn) if split_m else (bm, wgs * bn)
  if n % cta_n:
    raise UnsupportedError(f"n={n} is not a multiple of the CTA tile's {cta_n} columns")
  num_visits = visits.shape[0]
  n_tiles = n // cta_n
  k_steps = k // bk
  lhs_spec = plgpu.BlockSpec((cta_m, bk), lambda kk: (0, kk),
                             transforms=_swizzled(bk, lhs.dtype))
  if transpose_rhs:
    rhs_spec = plgpu.BlockSpec((cta_n, bk), lambda kk: (0, kk),
                               transforms=_swizzled(bk, rhs.dtype))
  else:
    rhs_spec = plgpu.BlockSpec((bk, cta_n), lambda kk: (kk, 0),
                               transforms=_swizzled(cta_n, rhs.dtype))

  def pipeline(step, compute_context, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        step, grid=(k_steps,), memory_registers=40, in_specs=[lhs_spec, rhs_spec],
        wg_axis="wg", num_compute_wgs=wgs, max_concurrent_steps=stages,
        compute_context=compute_context, pipeline_state=state)

  def rhs_tile(rhs_gmem, g, j):
    if transpose_rhs:
      return rhs_gmem.at[g, pl.ds(j * cta_n, cta_n), :]
    return rhs_gmem.at[g, :, pl.ds(j * cta_n, cta_n)]

  def body(visits_gmem, counts_gmem, lhs_gmem, rhs_gmem, out_gmem):
    ignore = lambda *_, **__: None
    allocs = pipeline(ignore, ignore).get_allocations(lhs_gmem.at[pl.ds(0, cta_m), :],
                                                      rhs_tile(rhs_gmem, 0, 0))

    @functools.partial(pl.run_scoped, allocs=allocs,
                       o_smem=plgpu.SMEM((wgs, bm, bn), out_dtype), collective_axes="wg")
    def _scope(allocs, o_smem):
      wg = jax.lax.axis_index("wg")

      def tile_work(v, j):
        """Visit v, column tile j -> (group, its rows [r0, r1), the pipeline's step, compute
        context and operands, a function storing this warpgroup's rows as zeros)."""
        g, tile, r0, r1 = (visits_gmem[v, c] for c in range(4))
        if split_m:       # this warpgroup's rows of the visit: [w0, w1) of [row0, row0 + bm)
          cols = pl.ds(j * cta_n, bn)
          row0 = tile * cta_m + wg * bm
          w0 = jnp.clip(r0, row0, row0 + bm)
          w1 = jnp.clip(r1, row0, row0 + bm)
        else:
          cols = pl.ds(j * cta_n + wg * bn, bn)
          row0, w0, w1 = tile * cta_m, r0, r1

        def step(_, a_smem, b_smem, acc_ref):
          if split_m:
            a = a_smem.at[pl.ds(wg * bm, bm), :]
            b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_rhs else b_smem

            # A visit of a group that starts or ends inside the CTA tile often leaves one
            # warpgroup's rows without any of it: that warpgroup skips its products, so a
            # straddling visit costs block_m rows of tensor-core work, not wgs x block_m
            # (the rows would be dropped at the store anyway).
            @pl.when(w1 > w0)
            def _():
              plgpu.wgmma(acc_ref, a, b)
              plgpu.wgmma_wait(0)
          else:
            a = a_smem
            if transpose_rhs:
              b = plgpu.transpose_ref(b_smem.at[pl.ds(wg * bn, bn), :], (1, 0))
            else:
              b = b_smem.at[:, pl.ds(wg * bn, bn)]
            plgpu.wgmma(acc_ref, a, b)
            plgpu.wgmma_wait(0)
          return acc_ref

        def compute_context(run):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
          def _(acc_ref):
            run(acc_ref)
            _store_rows(acc_ref[...], o_smem.at[wg], out_gmem, row0, w0, w1, cols)

        operands = (lhs_gmem.at[pl.ds(tile * cta_m, cta_m), :],
                    rhs_tile(rhs_gmem, jnp.minimum(g, num_groups - 1), j))
        zeros = lambda: _store_rows(jnp.zeros((bm, bn), jnp.float32), o_smem.at[wg], out_gmem,
                                    row0, w0, w1, cols)
        return g, r0, r1, step, compute_context, operands, zeros

      if not chain:
        @plgpu.nd_loop((num_visits * n_tiles,), collective_axes="sm")
        def _visit_tile(info):
          (lin,) = info.index
          g, r0, r1, step, ctx, operands, zeros = tile_work(lin // n_tiles, lin % n_tiles)

          @pl.when((r0 < r1) & (g < num_groups))
          def _():
            pipeline(step, ctx)(*operands, allocations=allocs)

          @pl.when((r0 < r1) & (g >= num_groups) & (wg < wgs))   # rows past the sum: zeros
          def _():
            zeros()
      else:
        n_real, n_past = counts_gmem[0], counts_gmem[1]
        n_sm = jax.lax.axis_size("sm")
        real_tiles = n_real * n_tiles

        @plgpu.nd_loop((real_tiles,), collective_axes="sm")
        def _real_tile(info):
          (lin,) = info.index
          _, _, _, step, ctx, operands, _ = tile_work(lin // n_tiles, lin % n_tiles)
          # this CTA's tiles are sm, sm + n_sm, ...: its first starts the chain, its last
          # stops it, and a CTA with one tile runs an ordinary pipeline
          first = lin < n_sm
          last = lin + n_sm >= real_tiles
          state = jnp.where(first, int(plgpu.PipelinePipeline.START),
                            jnp.where(last, int(plgpu.PipelinePipeline.STOP),
                                      int(plgpu.PipelinePipeline.STEADY)))

          @pl.when(first & last)
          def _():
            pipeline(step, ctx)(*operands, allocations=allocs)

          @pl.when(jnp.logical_not(first & last))
          def _():
            pipeline(step, ctx, state)(*operands, allocations=allocs)

        @plgpu.nd_loop((n_past * n_tiles,), collective_axes="sm")
        def _past_tile(info):
          (lin,) = info.index
          *_, zeros = tile_work(n_real + lin // n_tiles, lin % n_tiles)

          @pl.when(wg < wgs)
          def _():
            zeros()

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = warpgroup_kernel(body, jax.ShapeDtypeStruct((m, n), out_dtype),
                            grid=(_num_ctas(interpret),), grid_names=("sm",),
                            interpret=interpret, zero_fill_oob=True,
                            num_threads=wgs + 1, thread_name="wg")
  g, r0, r1 = visits[:, 0], visits[:, 2], visits[:, 3]
  rows = r0 < r1
  # visits of real groups first, then those of the rows past the sum (metadata.tile_visits)
  counts = jnp.stack([jnp.sum(rows & (g < num_groups)), jnp.sum(rows & (g >= num_groups))])
  return kernel(visits, counts.astype(jnp.int32), lhs, rhs)


# ---------------------------------------------------------------------------------- tgmm
def _zero_rows_outside(ref, lo, hi, axis):
  """ref[...] with the entries at index < lo or >= hi along `axis` set to zero (in place)."""
  val = ref[...]
  pos = jax.lax.broadcasted_iota(jnp.int32, val.shape, axis)
  ref[...] = jnp.where((pos >= lo) & (pos < hi), val, jnp.zeros_like(val))
  plgpu.commit_smem()     # ordinary stores, read next by the tensor cores


def tgmm(lhs, rhs, group_sizes, *, out_dtype, interpret, config):
  """out[g] = lhs[rows of g]^T @ rhs[rows of g]: lhs [m, k], rhs [m, n] -> [g, k, n].

  One output tile (group, k tile, n tile) per step of a persistent loop; its contraction runs
  over chunks of mgpu_tgmm_block_m rows aligned to the chunk size (the Mosaic GPU compiler must
  prove a TMA box's start divisible, so a box cannot start at a group's first row). The first
  and last chunks of a group may hold rows of its neighbours: those rows are zeroed in shared
  memory before the wgmma. lhs chunks are read [rows, k tile] and fed transposed; interpret
  mode (no transposed wgmma operand) reads a transposed copy of lhs instead. Empty groups give
  zeros.
  """
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  m, k = lhs.shape
  n = rhs.shape[1]
  num_groups = group_sizes.shape[0]
  tk, bn, br = config.mgpu_tgmm_block_k, config.mgpu_tgmm_block_n, config.mgpu_tgmm_block_m
  dtype = jnp.dtype(lhs.dtype)
  require_hopper(interpret)
  if dtype not in _DTYPES or jnp.dtype(rhs.dtype) != dtype:
    raise UnsupportedError(f"dtypes {lhs.dtype}/{rhs.dtype} (Mosaic GPU tgmm: bf16 or f16)")
  if jnp.dtype(out_dtype) not in _DTYPES + (jnp.dtype(jnp.float32),):
    raise UnsupportedError(f"output dtype {out_dtype}")
  if tk % 64 or (tk * dtype.itemsize) % 128 or (bn * dtype.itemsize) % 128 or bn > 256:
    raise UnsupportedError(f"mgpu tgmm tiles k={tk} n={bn}: k a multiple of 64 and both "
                           "whole 128-byte rows (n <= 256)")
  if br * dtype.itemsize != 128:
    raise UnsupportedError(f"mgpu_tgmm_block_m {br}: one 128-byte row of rows (64 for bf16)")
  if k % tk or n % bn or (m % 8 and m > 8):
    raise UnsupportedError(f"tgmm shapes m={m} k={k} n={n}: need m % 8, k % {tk}, n % {bn}")
  if num_groups == 0 or m == 0:
    return jnp.zeros((num_groups, k, n), out_dtype)
  starts, ends = metadata.group_bounds(group_sizes)
  ends = jnp.minimum(ends, m)
  bounds = jnp.stack([jnp.minimum(starts, ends), ends], axis=1)     # [g, 2]
  k_tiles, n_tiles = k // tk, n // bn
  transposed_copy = interpret
  src = lhs.T if transposed_copy else lhs                           # [k, m] / [m, k]
  a_block = (tk, br) if transposed_copy else (br, tk)
  a_transforms = _swizzled(a_block[1], dtype)
  b_transforms = _swizzled(bn, dtype)
  stages = fit_stages(config.mgpu_tgmm_stages, (br * tk + br * bn) * dtype.itemsize,
                      tk * bn * jnp.dtype(out_dtype).itemsize, f"tgmm tile {tk} x {bn} x {br}")

  def body(bounds_gmem, lhs_gmem, rhs_gmem, out_gmem):
    pl.run_scoped(functools.partial(tiles, bounds_gmem, lhs_gmem, rhs_gmem, out_gmem),
                  plgpu.SMEM((tk, bn), out_dtype, transforms=_swizzled(bn, out_dtype)))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  def tiles(bounds_gmem, lhs_gmem, rhs_gmem, out_gmem, o_smem):
    @plgpu.nd_loop((num_groups * k_tiles * n_tiles,), collective_axes="sm")
    def _tile(info):
      (lin,) = info.index
      g = lin // (k_tiles * n_tiles)
      i = (lin // n_tiles) % k_tiles
      j = lin % n_tiles
      start, end = bounds_gmem[g, 0], bounds_gmem[g, 1]
      first = start // br
      n_chunks = jnp.where(end > start, (end + br - 1) // br - first, 0)

      def a_index(c):
        return (i, first + c) if transposed_copy else (first + c, i)

      def accumulate(acc_ref):
        def step(idx, a_smem, b_smem):
          (c,) = idx
          row0 = (first + c) * br              # the chunk's first row
          lo, hi = start - row0, end - row0     # rows [lo, hi) of the chunk are the group's

          @pl.when((lo > 0) | (hi < br))
          def _():
            _zero_rows_outside(a_smem, lo, hi, 1 if transposed_copy else 0)
            _zero_rows_outside(b_smem, lo, hi, 0)

          a = a_smem if transposed_copy else plgpu.transpose_ref(a_smem, (1, 0))
          plgpu.wgmma(acc_ref, a, b_smem)

        plgpu.emit_pipeline(
            step, grid=(n_chunks,),
            in_specs=[
                plgpu.BlockSpec(a_block, a_index, transforms=a_transforms),
                plgpu.BlockSpec((br, bn), lambda c: (first + c, j), transforms=b_transforms),
            ],
            max_concurrent_steps=stages,
        )(lhs_gmem, rhs_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(accumulate, plgpu.ACC((tk, bn)))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous tile's store read o_smem
      o_smem[...] = acc.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[g, pl.ds(i * tk, tk), pl.ds(j * bn, bn)])

  kernel = warpgroup_kernel(body, jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
                            grid=(_num_ctas(interpret),), grid_names=("sm",),
                            interpret=interpret, zero_fill_oob=True)
  return kernel(bounds, src, rhs)
