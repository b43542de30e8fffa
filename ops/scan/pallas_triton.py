"""Linear scan as Pallas Triton kernels (GPU).

Design (memory-bound; batch*channels is the only cheap parallelism):
  * grid = (batch, cdiv(channels, block_c)); each program walks all of time for its channels,
    carrying h in float32 registers. Channels past the end are masked (never padded in HBM).
  * Time runs in chunks of `time_chunk` fully unrolled steps. Every input row is loaded
    `time_chunk` steps before it is used: step s consumes the row prefetched one chunk earlier
    and immediately issues the load of row s + time_chunk into the same register slot, so
    ~time_chunk rows per input are always in flight and HBM latency is hidden without shared
    memory. Rows past the end of time are masked loads (no traffic); T need not be a multiple
    of anything.
  * Backward is a second kernel walking time the other way: with lam_t = dL/dh_t (total),
    lam_t = g_t + a_next * lam_next, db_t = lam_t, da_t = lam_t * h_prev(t), dh0 = a_first *
    lam_first. It reads a, g, h (the forward output, in b.dtype) and writes da, db; for a
    per-channel a, da is accumulated in registers and only [batch, channels] is written.
Traffic: forward reads a, b and writes h; backward reads a, g, h and writes da, db.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops import _backend
from ops._backend import UnsupportedError
from ops.scan import pallas_triton_segments
from ops.scan.config import ScanConfig
from ops.scan.vjp import with_vjp

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _compiler_params(num_warps, num_stages):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _time_index(s, T, reverse):
  """Time index of scan step s (clamped into range; callers mask with s < T)."""
  t = (T - 1 - s) if reverse else s
  return jnp.clip(t, 0, T - 1)


def _load_row(ref, t, mask):
  return plgpu.load(ref.at[t, :], mask=mask, other=0).astype(jnp.float32)


def _fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hlast_ref, *, T, C, BC, TT, reverse, a_const):
  j = pl.program_id(1)
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  n_chunks = pl.cdiv(T, TT)

  def load(ref, s):
    return _load_row(ref, _time_index(s, T, reverse), cmask & (s < T))

  h = plgpu.load(h0_ref.at[:], mask=cmask, other=0).astype(jnp.float32)
  a_c = plgpu.load(a_ref.at[:], mask=cmask, other=0).astype(jnp.float32) if a_const else None
  abuf = () if a_const else tuple(load(a_ref, jnp.int32(i)) for i in range(TT))
  bbuf = tuple(load(b_ref, jnp.int32(i)) for i in range(TT))

  def body(k, carry):
    h, abuf, bbuf = carry
    new_a, new_b = [], []
    for i in range(TT):
      s = k * TT + i
      a_i = a_c if a_const else abuf[i]
      b_i = bbuf[i]
      if not a_const:
        new_a.append(load(a_ref, s + TT))
      new_b.append(load(b_ref, s + TT))
      valid = s < T
      h_new = a_i * h + b_i
      plgpu.store(h_ref.at[_time_index(s, T, reverse), :], h_new.astype(h_ref.dtype),
                  mask=cmask & valid)
      h = jnp.where(valid, h_new, h)
    return h, tuple(new_a), tuple(new_b)

  h, _, _ = lax.fori_loop(0, n_chunks, body, (h, abuf, bbuf))
  plgpu.store(hlast_ref.at[:], h, mask=cmask)


def _bwd_kernel(a_ref, h_ref, h0_ref, g_ref, glast_ref, da_ref, db_ref, dh0_ref, *, T, C, BC,
                TT, P, reverse, a_const):
  """Walks the forward steps backwards: r = 0..T-1 is forward step s = T-1-r. P chunks of TT
  rows of each input are in flight (the body consumes the oldest, loads the one P chunks on)."""
  j = pl.program_id(1)
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  n_chunks = pl.cdiv(T, TT)

  def rows(r):
    s = T - 1 - r
    valid = r < T
    t = _time_index(s, T, reverse)
    tp = _time_index(s - 1, T, reverse)   # time of the previous forward step
    g = _load_row(g_ref, t, cmask & valid)
    hp = _load_row(h_ref, tp, cmask & valid & (s >= 1))
    a = None if a_const else _load_row(a_ref, t, cmask & valid)
    return a, g, hp

  h0 = plgpu.load(h0_ref.at[:], mask=cmask, other=0).astype(jnp.float32)
  c = plgpu.load(glast_ref.at[:], mask=cmask, other=0).astype(jnp.float32)
  a_c = plgpu.load(a_ref.at[:], mask=cmask, other=0).astype(jnp.float32) if a_const else None
  def chunk(c0):
    loaded = [rows(jnp.int32(c0 + i)) for i in range(TT)]
    return (() if a_const else tuple(x[0] for x in loaded), tuple(x[1] for x in loaded),
            tuple(x[2] for x in loaded))

  bufs = tuple(chunk(q * TT) for q in range(P))
  da_acc = jnp.zeros((BC,), jnp.float32)

  def body(k, carry):
    c, da_acc, bufs = carry
    abuf, gbuf, hbuf = bufs[0]
    new_a, new_g, new_h = [], [], []
    for i in range(TT):
      r = k * TT + i
      s = T - 1 - r
      valid = r < T
      a_i = a_c if a_const else abuf[i]
      g_i, hp_i = gbuf[i], hbuf[i]
      na, ng, nh = rows(r + P * TT)
      if not a_const:
        new_a.append(na)
      new_g.append(ng)
      new_h.append(nh)
      hp_i = jnp.where(s == 0, h0, hp_i)
      lam = g_i + c
      t = _time_index(s, T, reverse)
      m = cmask & valid
      plgpu.store(db_ref.at[t, :], lam.astype(db_ref.dtype), mask=m)
      if a_const:
        da_acc = da_acc + jnp.where(valid, lam * hp_i, 0.0)
      else:
        plgpu.store(da_ref.at[t, :], (lam * hp_i).astype(da_ref.dtype), mask=m)
      c = jnp.where(valid, a_i * lam, c)
    return c, da_acc, bufs[1:] + ((tuple(new_a), tuple(new_g), tuple(new_h)),)

  c, da_acc, _ = lax.fori_loop(0, n_chunks, body, (c, da_acc, bufs))
  plgpu.store(dh0_ref.at[:], c, mask=cmask)
  if a_const:
    plgpu.store(da_ref.at[:], da_acc, mask=cmask)


def _specs(B, T, C, BC, a_const):
  full = pl.BlockSpec((None, T, BC), lambda i, j: (i, 0, j))
  row = pl.BlockSpec((None, BC), lambda i, j: (i, j))
  a_spec = pl.BlockSpec((BC,), lambda i, j: (j,)) if a_const else full
  return full, row, a_spec


def _forward(a, b, h0, reverse, interpret, config):
  if config.segment:
    return pallas_triton_segments.forward(
        a, b, h0, reverse, interpret, config,
        _compiler_params(config.num_warps, config.num_stages))
  B, T, C = b.shape
  a_const = a.ndim == 1
  BC, TT = config.block_c, config.time_chunk
  full, row, a_spec = _specs(B, T, C, BC, a_const)
  kernel = functools.partial(_fwd_kernel, T=T, C=C, BC=BC, TT=TT, reverse=reverse,
                             a_const=a_const)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, C), b.dtype),
                 jax.ShapeDtypeStruct((B, C), jnp.float32)),
      grid=(B, pl.cdiv(C, BC)),
      in_specs=[a_spec, full, row],
      out_specs=(full, row),
      interpret=interpret,
      compiler_params=_compiler_params(config.num_warps, config.num_stages),
      name="linear_scan_fwd",
  )(a, b, h0)


def _backward(a, h, h0, g, g_last, reverse, interpret, config):
  if config.bwd_segment:
    return pallas_triton_segments.backward(
        a, h, h0, g, g_last, reverse, interpret, config,
        _compiler_params(config.bwd_num_warps, config.num_stages))
  B, T, C = h.shape
  a_const = a.ndim == 1
  BC, TT = config.bwd_block_c, config.bwd_time_chunk
  full, row, a_spec = _specs(B, T, C, BC, a_const)
  kernel = functools.partial(_bwd_kernel, T=T, C=C, BC=BC, TT=TT,
                             P=config.bwd_prefetch_chunks, reverse=reverse, a_const=a_const)
  da_shape = (jax.ShapeDtypeStruct((B, C), jnp.float32) if a_const
              else jax.ShapeDtypeStruct((B, T, C), a.dtype))
  da, db, dh0 = pl.pallas_call(
      kernel,
      out_shape=(da_shape, jax.ShapeDtypeStruct((B, T, C), h.dtype),
                 jax.ShapeDtypeStruct((B, C), jnp.float32)),
      grid=(B, pl.cdiv(C, BC)),
      in_specs=[a_spec, full, row, full, row],
      out_specs=(row if a_const else full, full, row),
      interpret=interpret,
      compiler_params=_compiler_params(config.bwd_num_warps, config.num_stages),
      name="linear_scan_bwd",
  )(a, h, h0, g, g_last)
  if a_const:
    da = da.sum(0).astype(a.dtype)
  return da, db, dh0


_scan = with_vjp(_forward, _backward)


def linear_scan(a, b, h0, *, reverse, interpret, config):
  """Implementation 'pallas_triton' (called by ops.scan.api with validated f32 h0)."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if b.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"dtype {b.dtype} (supported: f32, bf16, f16)")
  if a.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"decay dtype {a.dtype}")
  if config is None:
    config = ScanConfig.for_device(None if interpret else _backend.device_kind())
  if config.lookback and (config.segment or config.bwd_segment) and not interpret:
    # the same look-back fold as the LIF backward's, whose compile segfaulted in the Triton
    # compiler on the H200 (jax 0.11.2, session 12). Interpret mode only, for now.
    raise UnsupportedError("ScanConfig.lookback: the look-back segments crash the Triton "
                           "compiler (jax 0.11.2); interpret mode only")
  return _scan(a, b, h0, bool(reverse), interpret, config)
