"""LIF forward and backward in Pallas Mosaic GPU (Hopper).

Why a second GPU forward: the Triton kernel keeps each program's next rows of x in flight as a
register ring, and at 8192 channels (256 programs of 32) it reaches ~36% of the copy bandwidth
on an H200 (session 6). Here each CTA owns `mgpu_block_c` channels of one batch row and an
emit_pipeline streams [mgpu_time_chunk, block_c] tiles of x into shared memory by TMA, with
`mgpu_stages` tiles in flight, while the warpgroup walks the resident tile row by row with v
in registers; spikes and the membrane checkpoints go out as TMA stores of whole tiles,
double-buffered so a tile's store overlaps the next tile's walk.

Same outputs as the Triton forward (spikes, v_last, and with a gradient the f32 membrane every
ckpt_every steps); the backward is the Triton one's recompute-from-checkpoint scheme (see
ops/lif/pallas_triton.py) over the same resident tiles, time tiles last to first.
T must be a multiple of mgpu_time_chunk (itself a multiple of ckpt_every) and C of
mgpu_block_c; other shapes raise UnsupportedError and dispatch moves on.
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
from ops.lif import steps
from ops.lif.config import LifConfig
from ops.lif.vjp import with_vjp

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _stages(config, dtype, backward: bool) -> int:
  """Pipeline depth of the forward or backward kernel (config.mgpu_stages; 0 = as many as fit).

  Forward stage: one x tile; beside it two slots of spikes and of checkpoints. Backward stage:
  x, ds and the checkpoint rows; beside it two slots of dx."""
  bc, tt, K = config.mgpu_block_c, config.mgpu_time_chunk, config.ckpt_every
  tile = tt * bc * jnp.dtype(dtype).itemsize
  ck = (tt // K) * bc * 4
  if backward:
    stage, fixed = 2 * tile + ck, 2 * tile + bc * 4
  else:
    stage, fixed = tile, 2 * tile + 2 * ck + bc * 4
  what = f"Mosaic GPU LIF {'backward' if backward else 'forward'} ({tt} x {bc} tiles)"
  return fit_stages(config.mgpu_stages, stage, fixed, what)


def _forward(x, v0, p, save_ckpt, interpret, config):
  """x [B, T, C], v0 [B, C] f32 -> spikes [B, T, C] (x.dtype), v_last [B, C] f32, and
  the checkpoint [B, T / ckpt_every, C] f32 (v before steps 0, K, 2K, ...) if save_ckpt."""
  B, T, C = x.shape
  bc, tt, K = config.mgpu_block_c, config.mgpu_time_chunk, config.ckpt_every
  n_ck = T // K
  outs = [jax.ShapeDtypeStruct((B, T, C), x.dtype), jax.ShapeDtypeStruct((B, C), jnp.float32)]
  if save_ckpt:
    outs.append(jax.ShapeDtypeStruct((B, n_ck, C), jnp.float32))

  def body(x_gmem, v0_gmem, s_gmem, vlast_gmem, *ck_gmem):
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("c")
    cols = pl.ds(j * bc, bc)

    n_out = 2 if save_ckpt else 1

    # Outputs leave through two shared-memory slots each (the store of step t - 1 may still
    # run while step t writes the other slot), issued by hand: the pipeline's own output
    # stores are predicated copies, which interpret mode does not run.
    @functools.partial(pl.run_scoped, v_smem=plgpu.SMEM((bc,), jnp.float32),
                       s_buf=plgpu.SMEM((2, tt, bc), x.dtype),
                       ck_buf=plgpu.SMEM((2, tt // K, bc), jnp.float32))
    def _(v_smem, s_buf, ck_buf):
      load_rows([(v0_gmem.at[b, cols], v_smem)])
      v = v_smem[...]

      def chunk(idx, x_smem, v):
        (t,) = idx
        slot = t % 2
        plgpu.wait_smem_to_gmem(n_out, wait_read_only=True)    # step t - 2 left this slot
        s_out, ck_out = s_buf.at[slot], ck_buf.at[slot]
        for i in range(tt):                 # static rows: the tile is resident
          if save_ckpt and i % K == 0:
            ck_out[i // K] = v
          _, v, spk = steps.step_forward(v, x_smem[i].astype(jnp.float32), p)
          s_out[i] = jnp.where(spk, 1.0, 0.0).astype(s_out.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_out, s_gmem.at[b, pl.ds(t * tt, tt), cols])
        if save_ckpt:
          plgpu.copy_smem_to_gmem(ck_out, ck_gmem[0].at[b, pl.ds(t * (tt // K), tt // K), cols])
        return v

      v = plgpu.emit_pipeline(
          chunk, grid=(T // tt,),
          in_specs=[plgpu.BlockSpec((tt, bc), lambda t: (t, j))],
          max_concurrent_steps=_stages(config, x.dtype, False), init_carry=v,
      )(x_gmem.at[b])
      store_rows([(v, v_smem, vlast_gmem.at[b, cols])])

  kernel = warpgroup_kernel(body, tuple(outs), grid=(B, C // bc), grid_names=("b", "c"),
                            interpret=interpret)
  return kernel(x, v0)


def _backward(x, ckpt, ds, gv, p, interpret, config):
  """x, ds [B, T, C]; ckpt [B, T / K, C] f32; gv [B, C] f32 -> dx [B, T, C] (x.dtype), dv0.

  The pipeline walks time tiles last to first (its index map reverses the step), streaming
  x, ds and the tile's checkpoint rows in; inside a tile each K-step segment, last first, is
  recomputed forward from its checkpoint (the pre-clip potentials stay in registers) and then
  walked backwards, writing dx rows to a shared-memory slot that a TMA store takes out.
  """
  B, T, C = x.shape
  bc, tt, K = config.mgpu_block_c, config.mgpu_time_chunk, config.ckpt_every
  n_t = T // tt

  def body(x_gmem, ck_gmem, ds_gmem, gv_gmem, dx_gmem, dv0_gmem):
    b = jax.lax.axis_index("b")
    j = jax.lax.axis_index("c")
    cols = pl.ds(j * bc, bc)

    @functools.partial(pl.run_scoped, dv_smem=plgpu.SMEM((bc,), jnp.float32),
                       dx_buf=plgpu.SMEM((2, tt, bc), dx_gmem.dtype))
    def _(dv_smem, dx_buf):
      load_rows([(gv_gmem.at[b, cols], dv_smem)])
      dv = dv_smem[...]

      def chunk(idx, x_smem, ds_smem, ck_smem, dv):
        (r,) = idx
        t = n_t - 1 - r                     # the time tile this step holds
        slot = r % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)        # step r - 2 left this slot
        dx_out = dx_buf.at[slot]
        for seg in reversed(range(tt // K)):
          v = ck_smem[seg]
          us = []
          for i in range(seg * K, seg * K + K):             # recompute the segment forward
            u, v, _ = steps.step_forward(v, x_smem[i].astype(jnp.float32), p)
            us.append(u)
          for i in reversed(range(seg * K, seg * K + K)):   # and walk it backwards
            du = steps.step_backward(us[i - seg * K], ds_smem[i].astype(jnp.float32),
                                             dv, p)
            dx_out[i] = du.astype(dx_out.dtype)
            dv = p["beta"] * du
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dx_out, dx_gmem.at[b, pl.ds(t * tt, tt), cols])
        return dv

      rev = lambda r: (n_t - 1 - r, j)
      dv = plgpu.emit_pipeline(
          chunk, grid=(n_t,),
          in_specs=[plgpu.BlockSpec((tt, bc), rev), plgpu.BlockSpec((tt, bc), rev),
                    plgpu.BlockSpec((tt // K, bc), rev)],
          max_concurrent_steps=_stages(config, x.dtype, True), init_carry=dv,
      )(x_gmem.at[b], ds_gmem.at[b], ck_gmem.at[b])
      store_rows([(dv, dv_smem, dv0_gmem.at[b, cols])])

  outs = (jax.ShapeDtypeStruct((B, T, C), x.dtype), jax.ShapeDtypeStruct((B, C), jnp.float32))
  kernel = warpgroup_kernel(body, outs, grid=(B, C // bc), grid_names=("b", "c"),
                            interpret=interpret)
  return kernel(x, ckpt, ds, gv)


_lif = with_vjp(_forward, _backward)


def lif(x, v0, *, params, interpret, config):
  """Implementation 'pallas_mosaic_gpu'; `params` is a sorted tuple of (name, value) pairs."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if jnp.dtype(x.dtype) not in _DTYPES:
    raise UnsupportedError(f"dtype {x.dtype} (Mosaic GPU LIF: f32, bf16)")
  require_hopper(interpret)
  if config is None:
    config = LifConfig.for_device(None if interpret else _backend.device_kind())
  B, T, C = x.shape
  bc, tt, K = config.mgpu_block_c, config.mgpu_time_chunk, config.ckpt_every
  if T % tt or tt % K or C % bc:
    raise UnsupportedError(f"Mosaic GPU LIF needs T % {tt} == 0 (a multiple of ckpt_every "
                           f"{K}) and C % {bc} == 0; got T={T}, C={C}")
  if bc % 128:
    # one channel per thread of the warpgroup; narrower vectors (64 channels) sent jax
    # 0.10.2's layout inference into a search that had not ended after five minutes
    raise UnsupportedError(f"mgpu_block_c {bc}: a multiple of 128 (one warpgroup's threads)")
  _stages(config, x.dtype, False), _stages(config, x.dtype, True)   # refuse before tracing
  return _lif(x, v0, params, interpret, config)
