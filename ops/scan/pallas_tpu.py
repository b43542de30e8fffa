"""Linear scan as Pallas TPU (Mosaic) kernels.

grid = (batch, channel blocks, time blocks); channels on lanes (tpu_block_c, multiple of 128),
time in blocks of tpu_block_t rows (multiple of 8), the time axis last and "arbitrary" so the
f32 state h lives in a VMEM scratch across time blocks. Each block is cast to f32 once and the
rows are walked with static indices (unrolled); outputs go through an f32 scratch and are
stored as one block. Edge blocks past T are masked out of the state update (their rows are
dropped on store). reverse=True maps time blocks backwards and walks rows backwards.
Backward walks time the other way: lam = g_t + c, db_t = lam, da_t = lam * h_prev(t),
c = a_t * lam; h_prev of a block's first row comes from an extra 8-row view of h next to the
block (or h0 at the sequence edge).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import _backend
from ops._backend import UnsupportedError
from ops.scan.config import ScanConfig
from ops.scan.vjp import with_vjp

_DTYPES = (jnp.float32, jnp.bfloat16)


def _params():
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hlast_ref, carry, out_s, *, T, TS, nT, reverse,
                a_const):
  k = pl.program_id(2)
  kk = (nT - 1 - k) if reverse else k

  @pl.when(k == 0)
  def _():
    carry[...] = h0_ref[...]

  af = a_ref[...].astype(jnp.float32)
  bf = b_ref[...].astype(jnp.float32)
  h = carry[...]
  for i in (reversed(range(TS)) if reverse else range(TS)):
    a_i = af if a_const else af[i:i + 1]
    h_new = a_i * h + bf[i:i + 1]
    out_s[i:i + 1, :] = h_new
    h = jnp.where(kk * TS + i < T, h_new, h)
  h_ref[...] = out_s[...].astype(h_ref.dtype)
  carry[...] = h

  @pl.when(k == nT - 1)
  def _():
    hlast_ref[...] = h


def _bwd_kernel(a_ref, h_ref, hside_ref, h0_ref, g_ref, glast_ref, da_ref, db_ref, dh0_ref,
                carry, da_acc, da_s, db_s, *, T, TS, nT, reverse, a_const):
  k = pl.program_id(2)
  kk = k if reverse else (nT - 1 - k)   # forward order reversed

  @pl.when(k == 0)
  def _():
    carry[...] = glast_ref[...]
    da_acc[...] = jnp.zeros_like(da_acc)

  af = a_ref[...].astype(jnp.float32)
  hf = h_ref[...].astype(jnp.float32)
  gf = g_ref[...].astype(jnp.float32)
  side = hside_ref[...].astype(jnp.float32)
  h0 = h0_ref[...]
  c = carry[...]
  acc = da_acc[...]
  for i in (range(TS) if reverse else reversed(range(TS))):
    t = kk * TS + i
    valid = t < T
    if reverse:
      hp = hf[i + 1:i + 2] if i + 1 < TS else side[0:1]
      hp = jnp.where(t + 1 >= T, h0, hp)
    else:
      hp = hf[i - 1:i] if i > 0 else side[7:8]
      hp = jnp.where(t == 0, h0, hp)
    lam = gf[i:i + 1] + c
    db_s[i:i + 1, :] = lam
    if a_const:
      acc = acc + jnp.where(valid, lam * hp, 0.0)
      a_i = af
    else:
      da_s[i:i + 1, :] = lam * hp
      a_i = af[i:i + 1]
    c = jnp.where(valid, a_i * lam, c)
  db_ref[...] = db_s[...].astype(db_ref.dtype)
  carry[...] = c
  if a_const:
    da_acc[...] = acc
  else:
    da_ref[...] = da_s[...].astype(da_ref.dtype)

  @pl.when(k == nT - 1)
  def _():
    dh0_ref[...] = c
    if a_const:
      da_ref[...] = acc


def _common(b, config, reverse):
  B, T, C = b.shape
  TS, BC = config.tpu_block_t, config.tpu_block_c
  BC = min(BC, pl.cdiv(C, 128) * 128)
  nT, nC = pl.cdiv(T, TS), pl.cdiv(C, BC)
  tmap = (lambda k: nT - 1 - k) if reverse else (lambda k: k)
  return B, T, C, TS, BC, nT, nC, tmap


def _forward(a, b, h0, reverse, interpret, config):
  B, T, C, TS, BC, nT, nC, tmap = _common(b, config, reverse)
  a_const = a.ndim == 1
  blk = pl.BlockSpec((None, TS, BC), lambda i, j, k: (i, tmap(k), j))
  row = pl.BlockSpec((None, 1, BC), lambda i, j, k: (i, 0, j))
  a_in = a.reshape(1, C) if a_const else a
  a_spec = pl.BlockSpec((1, BC), lambda i, j, k: (0, j)) if a_const else blk
  kernel = functools.partial(_fwd_kernel, T=T, TS=TS, nT=nT, reverse=reverse, a_const=a_const)
  h, h_last = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, C), b.dtype),
                 jax.ShapeDtypeStruct((B, 1, C), jnp.float32)),
      grid=(B, nC, nT), in_specs=[a_spec, blk, row], out_specs=(blk, row),
      scratch_shapes=[pltpu.VMEM((1, BC), jnp.float32), pltpu.VMEM((TS, BC), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="linear_scan_fwd_tpu",
  )(a_in, b, h0.reshape(B, 1, C))
  return h, h_last.reshape(B, C)


def _backward(a, h, h0, g, g_last, reverse, interpret, config):
  B, T, C, TS, BC, nT, nC, bmap = _common(h, config, not reverse)
  a_const = a.ndim == 1
  n8, r8 = pl.cdiv(T, 8), TS // 8
  blk = pl.BlockSpec((None, TS, BC), lambda i, j, k: (i, bmap(k), j))
  if reverse:   # h_prev of a block's last row: first row of the next block
    side_map = lambda i, j, k: (i, jnp.minimum((bmap(k) + 1) * r8, n8 - 1), j)
  else:         # h_prev of a block's first row: last row of the previous block
    side_map = lambda i, j, k: (i, jnp.maximum(bmap(k) * r8 - 1, 0), j)
  side = pl.BlockSpec((None, 8, BC), side_map)
  row = pl.BlockSpec((None, 1, BC), lambda i, j, k: (i, 0, j))
  a_in = a.reshape(1, C) if a_const else a
  a_spec = pl.BlockSpec((1, BC), lambda i, j, k: (0, j)) if a_const else blk
  da_shape = (jax.ShapeDtypeStruct((B, 1, C), jnp.float32) if a_const
              else jax.ShapeDtypeStruct((B, T, C), a.dtype))
  kernel = functools.partial(_bwd_kernel, T=T, TS=TS, nT=nT, reverse=reverse, a_const=a_const)
  da, db, dh0 = pl.pallas_call(
      kernel,
      out_shape=(da_shape, jax.ShapeDtypeStruct((B, T, C), h.dtype),
                 jax.ShapeDtypeStruct((B, 1, C), jnp.float32)),
      grid=(B, nC, nT), in_specs=[a_spec, blk, side, row, blk, row],
      out_specs=(row if a_const else blk, blk, row),
      scratch_shapes=[pltpu.VMEM((1, BC), jnp.float32), pltpu.VMEM((1, BC), jnp.float32),
                      pltpu.VMEM((TS, BC), jnp.float32), pltpu.VMEM((TS, BC), jnp.float32)],
      compiler_params=_params(), interpret=interpret, name="linear_scan_bwd_tpu",
  )(a_in, h, h, h0.reshape(B, 1, C), g, g_last.reshape(B, 1, C))
  if a_const:
    da = da.reshape(B, C).sum(0).astype(a.dtype)
  return da, db, dh0.reshape(B, C)


_scan = with_vjp(_forward, _backward)


def linear_scan(a, b, h0, *, reverse, interpret, config):
  """Implementation 'pallas_tpu' (called by ops.scan.api with validated f32 h0)."""
  interpret = _backend.resolve_interpret(interpret, _backend.TPU)
  for name, x in (("b", b), ("a", a)):
    if x.dtype not in [jnp.dtype(d) for d in _DTYPES]:
      raise UnsupportedError(f"{name} dtype {x.dtype} (supported: f32, bf16)")
  if config is None:
    config = ScanConfig.for_device(None if interpret else _backend.device_kind())
  return _scan(a, b, h0, bool(reverse), interpret, config)
