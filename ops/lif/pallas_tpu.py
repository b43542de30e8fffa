"""Leaky integrate-and-fire as Pallas TPU (Mosaic) kernels.

grid = (batch, channel blocks, time blocks); channels on lanes (tpu_block_c, multiple of 128),
time in blocks of tpu_block_t rows (multiple of 8), time last and "arbitrary" with v carried in
a VMEM scratch. Rows are walked with static indices (unrolled) on an f32 copy of the block.
The forward writes the membrane state at the start of every time block ([B, nT, 1, C] f32) when
a gradient will be taken; the backward walks time blocks last to first, recomputes the block's
pre-clip potentials from that checkpoint and x, then walks the rows backwards (same step
functions as the Triton kernels, so the semantics are shared).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import _backend
from ops._backend import UnsupportedError
from ops.lif.config import LifConfig
from ops.lif.vjp import with_vjp
from ops.lif.steps import step_backward, step_forward

_DTYPES = (jnp.float32, jnp.bfloat16)


def _params():
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _fwd_kernel(x_ref, v0_ref, s_ref, vlast_ref, *rest, T, TS, nT, p):
  *ckpt, carry, out_s = rest
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    carry[...] = v0_ref[...]

  v = carry[...]
  if ckpt:
    ckpt[0][...] = v
  xf = x_ref[...].astype(jnp.float32)
  for i in range(TS):
    _, v_new, spk = step_forward(v, xf[i:i + 1], p)
    out_s[i:i + 1, :] = jnp.where(spk, 1.0, 0.0)
    v = jnp.where(k * TS + i < T, v_new, v)
  s_ref[...] = out_s[...].astype(s_ref.dtype)
  carry[...] = v

  @pl.when(k == nT - 1)
  def _():
    vlast_ref[...] = v


def _bwd_kernel(x_ref, ck_ref, ds_ref, gv_ref, dx_ref, dv0_ref, carry, dx_s, *, T, TS, nT, p):
  k = pl.program_id(2)
  kk = nT - 1 - k

  @pl.when(k == 0)
  def _():
    carry[...] = gv_ref[...]

  xf = x_ref[...].astype(jnp.float32)
  dsf = ds_ref[...].astype(jnp.float32)
  v = ck_ref[...]
  us = []
  for i in range(TS):
    u, v, _ = step_forward(v, xf[i:i + 1], p)
    us.append(u)
  dv = carry[...]
  for i in reversed(range(TS)):
    du = step_backward(us[i], dsf[i:i + 1], dv, p)
    dx_s[i:i + 1, :] = du
    dv = jnp.where(kk * TS + i < T, p["beta"] * du, dv)
  dx_ref[...] = dx_s[...].astype(dx_ref.dtype)
  carry[...] = dv

  @pl.when(k == nT - 1)
  def _():
    dv0_ref[...] = dv


def _dims(x, config):
  B, T, C = x.shape
  TS = config.tpu_block_t
  BC = min(config.tpu_block_c, pl.cdiv(C, 128) * 128)
  return B, T, C, TS, BC, pl.cdiv(T, TS), pl.cdiv(C, BC)


def _forward(x, v0, p, save_ckpt, interpret, config):
  B, T, C, TS, BC, nT, nC = _dims(x, config)
  blk = pl.BlockSpec((None, TS, BC), lambda i, j, k: (i, k, j))
  row = pl.BlockSpec((None, 1, BC), lambda i, j, k: (i, 0, j))
  out_shape = [jax.ShapeDtypeStruct((B, T, C), x.dtype),
               jax.ShapeDtypeStruct((B, 1, C), jnp.float32)]
  out_specs = [blk, row]
  if save_ckpt:
    out_shape.append(jax.ShapeDtypeStruct((B, nT, 1, C), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, 1, BC), lambda i, j, k: (i, k, 0, j)))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, T=T, TS=TS, nT=nT, p=p),
      out_shape=tuple(out_shape), grid=(B, nC, nT), in_specs=[blk, row],
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((1, BC), jnp.float32), pltpu.VMEM((TS, BC), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="lif_fwd_tpu",
  )(x, v0.reshape(B, 1, C))
  return (outs[0], outs[1].reshape(B, C)) + tuple(outs[2:])


def _backward(x, ckpt, ds, gv, p, interpret, config):
  B, T, C, TS, BC, nT, nC = _dims(x, config)
  blk = pl.BlockSpec((None, TS, BC), lambda i, j, k: (i, nT - 1 - k, j))
  row = pl.BlockSpec((None, 1, BC), lambda i, j, k: (i, 0, j))
  ck = pl.BlockSpec((None, None, 1, BC), lambda i, j, k: (i, nT - 1 - k, 0, j))
  dx, dv0 = pl.pallas_call(
      functools.partial(_bwd_kernel, T=T, TS=TS, nT=nT, p=p),
      out_shape=(jax.ShapeDtypeStruct((B, T, C), x.dtype),
                 jax.ShapeDtypeStruct((B, 1, C), jnp.float32)),
      grid=(B, nC, nT), in_specs=[blk, ck, blk, row], out_specs=(blk, row),
      scratch_shapes=[pltpu.VMEM((1, BC), jnp.float32), pltpu.VMEM((TS, BC), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="lif_bwd_tpu",
  )(x, ckpt, ds, gv.reshape(B, 1, C))
  return dx, dv0.reshape(B, C)


_lif = with_vjp(_forward, _backward)


def lif(x, v0, *, params, interpret, config):
  """Implementation 'pallas_tpu'; `params` is a sorted tuple of (name, value) pairs."""
  interpret = _backend.resolve_interpret(interpret, _backend.TPU)
  if x.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"dtype {x.dtype} (supported: f32, bf16)")
  if config is None:
    config = LifConfig.for_device(None if interpret else _backend.device_kind())
  return _lif(x, v0, params, interpret, config)
