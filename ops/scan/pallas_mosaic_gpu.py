"""Linear scan in Pallas Mosaic GPU (Hopper), forward and backward.

The same scheme as ops/lif/pallas_mosaic_gpu.py: one CTA per (batch row, mgpu_block_c
channels); an emit_pipeline streams [mgpu_time_chunk, block_c] tiles of the inputs into shared
memory by TMA (mgpu_stages in flight) while the warpgroup walks the resident tile row by row
with h in registers; outputs leave by double-buffered TMA stores of whole tiles.

Scan steps are numbered in scan order (s = 0 first; with reverse=True step s is time
T - 1 - s): the pipeline's index maps and the row order inside a tile follow that order, so
reverse costs nothing. The backward walks the steps last to first: lam = g + c, db = lam,
da = lam * h_prev, c = a * lam; h_prev of a tile's first step is the last step of the tile
before it, read as an 8-row block beside the tile (h0 for the first tile). A per-channel a
accumulates da in registers ([batch, channels], summed over batch afterwards).
T must be a multiple of mgpu_time_chunk (itself of 8) and C of mgpu_block_c.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import _backend
from ops._backend import UnsupportedError
from ops._mosaic_gpu import fit_stages, load_rows, require_hopper, store_rows, warpgroup_kernel
from ops.scan.config import ScanConfig
from ops.scan.vjp import with_vjp

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_PREV = 8     # rows of the side block that holds the previous tile's last step


def _kernel(body, outs, B, C, bc, interpret):
  return warpgroup_kernel(body, outs, grid=(B, C // bc), grid_names=("b", "c"),
                          interpret=interpret)


def _stages(config, a_dtype, b_dtype, a_const: bool, backward: bool) -> int:
  """Pipeline depth of the forward or backward kernel (config.mgpu_stages; 0 = as many as fit).

  Forward stage: the a (unless per-channel) and b tiles; beside it two slots of h. Backward
  stage: a, h, the 8-row side block of h and g; beside it two slots of db and of da."""
  bc, tt = config.mgpu_block_c, config.mgpu_time_chunk
  a_tile = 0 if a_const else tt * bc * jnp.dtype(a_dtype).itemsize
  b_tile = tt * bc * jnp.dtype(b_dtype).itemsize      # h, g and db have b's dtype
  vec = 3 * bc * 4
  if backward:
    stage = a_tile + 2 * b_tile + _PREV * bc * jnp.dtype(b_dtype).itemsize
    fixed = 2 * b_tile + 2 * a_tile + vec
  else:
    stage, fixed = a_tile + b_tile, 2 * b_tile + vec
  what = f"Mosaic GPU scan {'backward' if backward else 'forward'} ({tt} x {bc} tiles)"
  return fit_stages(config.mgpu_stages, stage, fixed, what)


def _forward(a, b, h0, reverse, interpret, config):
  """a [B, T, C] or [C]; b [B, T, C]; h0 [B, C] f32 -> h [B, T, C] (b.dtype), h_last f32."""
  B, T, C = b.shape
  bc, tt = config.mgpu_block_c, config.mgpu_time_chunk
  n_t = T // tt
  a_const = a.ndim == 1
  tile = (lambda s: n_t - 1 - s) if reverse else (lambda s: s)   # time tile of scan tile s
  rows = range(tt - 1, -1, -1) if reverse else range(tt)         # rows in scan order

  def body(a_gmem, b_gmem, h0_gmem, h_gmem, hlast_gmem):
    bi = jax.lax.axis_index("b")
    j = jax.lax.axis_index("c")
    cols = pl.ds(j * bc, bc)

    @functools.partial(pl.run_scoped, h_smem=plgpu.SMEM((bc,), jnp.float32),
                       a_smem=plgpu.SMEM((bc,), a.dtype),
                       h_buf=plgpu.SMEM((2, tt, bc), b.dtype))
    def _(h_smem, a_smem, h_buf):
      pairs = [(h0_gmem.at[bi, cols], h_smem)]
      if a_const:
        pairs.append((a_gmem.at[cols], a_smem))
      load_rows(pairs)
      h = h_smem[...]
      a_c = a_smem[...].astype(jnp.float32) if a_const else None

      def step(idx, *refs):
        *ins, h = refs
        (s,) = idx
        a_t = None if a_const else ins[0]
        b_t = ins[-1]
        slot = s % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)     # step s - 2 left this slot
        out = h_buf.at[slot]
        for i in rows:
          a_i = a_c if a_const else a_t[i].astype(jnp.float32)
          h = a_i * h + b_t[i].astype(jnp.float32)
          out[i] = h.astype(out.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, h_gmem.at[bi, pl.ds(tile(s) * tt, tt), cols])
        return h

      spec = plgpu.BlockSpec((tt, bc), lambda s: (tile(s), j))
      srcs = ([] if a_const else [a_gmem.at[bi]]) + [b_gmem.at[bi]]
      stages = _stages(config, a.dtype, b.dtype, a_const, False)
      h = plgpu.emit_pipeline(step, grid=(n_t,), in_specs=[spec] * len(srcs),
                              max_concurrent_steps=stages, init_carry=h)(*srcs)
      store_rows([(h, h_smem, hlast_gmem.at[bi, cols])])

  outs = (jax.ShapeDtypeStruct((B, T, C), b.dtype), jax.ShapeDtypeStruct((B, C), jnp.float32))
  return _kernel(body, outs, B, C, bc, interpret)(a, b, h0)


def _backward(a, h, h0, g, g_last, reverse, interpret, config):
  """-> da (a's shape; per-channel a summed over batch and time), db [B, T, C], dh0 [B, C]."""
  B, T, C = h.shape
  bc, tt = config.mgpu_block_c, config.mgpu_time_chunk
  n_t = T // tt
  a_const = a.ndim == 1
  # scan tile s holds time tile tile(s); the backward takes scan tiles last to first
  tile = (lambda s: n_t - 1 - s) if reverse else (lambda s: s)
  rows = list(range(tt - 1, -1, -1)) if reverse else list(range(tt))   # scan order
  # the 8-row block holding the step before scan tile s, and that step's row in it
  if reverse:
    prev_block = lambda s: jnp.minimum((tile(s) + 1) * tt // _PREV, T // _PREV - 1)
    prev_row = 0
  else:
    prev_block = lambda s: jnp.maximum(s * tt // _PREV - 1, 0)
    prev_row = _PREV - 1

  def body(a_gmem, h_gmem, h0_gmem, g_gmem, glast_gmem, da_gmem, db_gmem, dh0_gmem):
    bi = jax.lax.axis_index("b")
    j = jax.lax.axis_index("c")
    cols = pl.ds(j * bc, bc)

    @functools.partial(pl.run_scoped, c_smem=plgpu.SMEM((bc,), jnp.float32),
                       h0_smem=plgpu.SMEM((bc,), jnp.float32),
                       a_smem=plgpu.SMEM((bc,), a.dtype),
                       db_buf=plgpu.SMEM((2, tt, bc), db_gmem.dtype),
                       **({} if a_const else {"da_buf": plgpu.SMEM((2, tt, bc), a.dtype)}))
    def _(c_smem, h0_smem, a_smem, db_buf, da_buf=None):
      pairs = [(glast_gmem.at[bi, cols], c_smem), (h0_gmem.at[bi, cols], h0_smem)]
      if a_const:
        pairs.append((a_gmem.at[cols], a_smem))
      load_rows(pairs)
      a_c = a_smem[...].astype(jnp.float32) if a_const else None
      h0 = h0_smem[...]
      init = (c_smem[...], jnp.zeros((bc,), jnp.float32))

      def step(idx, *refs):
        *ins, (c, da_acc) = refs
        (r,) = idx
        s = n_t - 1 - r                     # scan tile
        a_t = None if a_const else ins[0]
        h_t, hp_t, g_t = ins[-3:]
        slot = r % 2
        n_out = 1 if a_const else 2
        plgpu.wait_smem_to_gmem(n_out, wait_read_only=True)   # step r - 2 left this slot
        db_out = db_buf.at[slot]
        da_out = None if a_const else da_buf.at[slot]
        # the predicate is broadcast by hand: Mosaic GPU's warpgroup lowering has no
        # implicit broadcast in select (a scalar predicate failed on the H200)
        first = jnp.broadcast_to(s == 0, (bc,))
        h_before = jnp.where(first, h0, hp_t[prev_row].astype(jnp.float32))
        for pos in reversed(range(tt)):     # scan order, last step first
          i = rows[pos]
          hp = h_t[rows[pos - 1]].astype(jnp.float32) if pos else h_before
          lam = g_t[i].astype(jnp.float32) + c
          db_out[i] = lam.astype(db_out.dtype)
          if a_const:
            da_acc = da_acc + lam * hp
            c = a_c * lam
          else:
            da_out[i] = (lam * hp).astype(da_out.dtype)
            c = a_t[i].astype(jnp.float32) * lam
        plgpu.commit_smem()
        t_rows = pl.ds(tile(s) * tt, tt)
        plgpu.copy_smem_to_gmem(db_out, db_gmem.at[bi, t_rows, cols])
        if not a_const:
          plgpu.copy_smem_to_gmem(da_out, da_gmem.at[bi, t_rows, cols])
        return c, da_acc

      tile_spec = plgpu.BlockSpec((tt, bc), lambda r: (tile(n_t - 1 - r), j))
      prev_spec = plgpu.BlockSpec((_PREV, bc), lambda r: (prev_block(n_t - 1 - r), j))
      specs = ([] if a_const else [tile_spec]) + [tile_spec, prev_spec, tile_spec]
      srcs = ([] if a_const else [a_gmem.at[bi]]) + [h_gmem.at[bi], h_gmem.at[bi],
                                                     g_gmem.at[bi]]
      c, da_acc = plgpu.emit_pipeline(
          step, grid=(n_t,), in_specs=specs, init_carry=init,
          max_concurrent_steps=_stages(config, a.dtype, h.dtype, a_const, True))(*srcs)
      last = [(c, c_smem, dh0_gmem.at[bi, cols])]
      if a_const:                           # h0_smem reused: this batch row's per-channel da
        last.append((da_acc, h0_smem, da_gmem.at[bi, cols]))
      store_rows(last)

  da_shape = (jax.ShapeDtypeStruct((B, C), jnp.float32) if a_const
              else jax.ShapeDtypeStruct((B, T, C), a.dtype))
  outs = (da_shape, jax.ShapeDtypeStruct((B, T, C), h.dtype),
          jax.ShapeDtypeStruct((B, C), jnp.float32))
  da, db, dh0 = _kernel(body, outs, B, C, bc, interpret)(a, h, h0, g, g_last)
  if a_const:
    da = da.sum(0).astype(a.dtype)
  return da, db, dh0


_scan = with_vjp(_forward, _backward)


def linear_scan(a, b, h0, *, reverse, interpret, config):
  """Implementation 'pallas_mosaic_gpu' (called by ops.scan.api with validated f32 h0)."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if jnp.dtype(b.dtype) not in _DTYPES or jnp.dtype(a.dtype) not in _DTYPES:
    raise UnsupportedError(f"dtypes {a.dtype}/{b.dtype} (Mosaic GPU scan: f32, bf16)")
  require_hopper(interpret)
  if config is None:
    config = ScanConfig.for_device(None if interpret else _backend.device_kind())
  B, T, C = b.shape
  bc, tt = config.mgpu_block_c, config.mgpu_time_chunk
  if T % tt or tt % _PREV or C % bc:
    raise UnsupportedError(f"Mosaic GPU scan needs T % {tt} == 0 ({tt} a multiple of "
                           f"{_PREV}) and C % {bc} == 0; got T={T}, C={C}")
  if bc % 128:
    # one channel per thread of the warpgroup; narrower vectors (64 channels) sent jax
    # 0.10.2's layout inference into a search that had not ended after five minutes
    raise UnsupportedError(f"mgpu_block_c {bc}: a multiple of 128 (one warpgroup's threads)")
  for backward in (False, True):                  # refuse before tracing
    _stages(config, a.dtype, b.dtype, a.ndim == 1, backward)
  return _scan(a, b, h0, bool(reverse), interpret, config)
