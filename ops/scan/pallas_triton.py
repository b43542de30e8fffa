"""Linear scan as Pallas Triton kernels (GPU).

Design (memory-bound; batch*channels is the only cheap parallelism):
  * grid = (batch, cdiv(channels, block_c)); each program walks all of time for its channels,
    carrying h in float32 registers. Channels past the end are masked (never padded in HBM);
    when block_c divides channels (static) no load or store carries a mask at all.
  * Time runs through a prefetch ring of `time_chunk` register slots, fully unrolled: step s
    consumes the row prefetched one chunk earlier and immediately issues the load of a later
    row into the same slot, so ~time_chunk rows per input are always in flight and HBM latency
    is hidden without shared memory.
  * With only ~2 warps per SM the GPU cannot hide per-step overhead, so the steps are split by
    what they need: the main loop runs over the T // time_chunk FULL chunks with no time mask,
    no select and no index clipping. During full chunk k the ring is refilled with steps
    base_k .. base_k + time_chunk - 1, base_k = min((k+1) * time_chunk, T - time_chunk): one
    clamp per chunk keeps every prefetch in range (the last full chunk reloads the final
    time_chunk steps; the rows before the tail are loaded but never used). The T % time_chunk
    remaining steps run in a tail after the loop; T is static, so these steps are static and
    in range and need no mask either: they read their rows from the ring (at slot
    time_chunk - tail + j after a full chunk, slot j when T < time_chunk). The main loop and
    the tail share one per-step helper.
  * Backward is a second kernel walking time the other way: with lam_t = dL/dh_t (total),
    lam_t = g_t + a_next * lam_next, db_t = lam_t, da_t = lam_t * h_prev(t), dh0 = a_first *
    lam_first. It reads a, g, h (the forward output, in b.dtype) and writes da, db; for a
    per-channel a, da is accumulated in registers and only [batch, channels] is written. Its
    last step (the forward's first) reads h0 instead of h: that step is kept out of the ring
    (its g and a rows are loaded up front), so the ring holds T - 1 alike steps, split into
    full chunks and a tail as above.
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
from ops.scan.config import ScanConfig

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _compiler_params(num_warps, num_stages):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _channel_mask(C, BC):
  """This program's in-range channels, or None when block_c divides channels (static): then
  every block is full and loads and stores carry no mask."""
  if C % BC == 0:
    return None
  j = pl.program_id(1)
  return (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C


def _view(ref, t):
  # A static row index is made an int32 scalar: interpret mode cannot discharge a Python int.
  return ref.at[:] if t is None else ref.at[jnp.asarray(t, jnp.int32), :]


def _load(ref, t, cmask):
  """Row t of a [T, block_c] ref (t None: the whole [block_c] ref) as f32."""
  return plgpu.load(_view(ref, t), mask=cmask,
                    other=None if cmask is None else 0).astype(jnp.float32)


def _store(ref, t, val, cmask):
  plgpu.store(_view(ref, t), val.astype(ref.dtype), mask=cmask)


def _ring(n, TT, load_step, step, carry):
  """Runs carry = step(carry, row, k, i) for steps s = k*TT + i = 0..n-1, row being what
  load_step(s) returned, loaded TT steps ahead through a ring of TT register slots.

  The n // TT full chunks run in a loop (k traced, i static) whose only index work is one clamp
  per chunk; the n % TT remaining steps are unrolled after it (k and i static) and read the
  rows that the last full chunk (or the prologue, when n < TT) left in the ring."""
  n_full, tail = divmod(n, TT)
  ring = tuple(load_step(i) for i in range(min(TT, n)))

  def body(k, state):
    carry, ring = state
    # Refill with steps base..base+TT-1. For k < n_full - 1 base = (k+1)*TT; the last full
    # chunk clamps to n - TT so no prefetch leaves [0, n) (rows before the tail are unused).
    base = jnp.minimum((k + 1) * TT, n - TT)
    new = []
    for i in range(TT):
      new.append(load_step(base + i))
      carry = step(carry, ring[i], k, i)
    return carry, tuple(new)

  if n_full:
    carry, ring = lax.fori_loop(0, n_full, body, (carry, ring))
  first = TT - tail if n_full else 0        # slot of the tail's first step
  for j in range(tail):
    carry = step(carry, ring[first + j], n_full, j)
  return carry


def _fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hlast_ref, *, T, C, BC, TT, reverse, a_const):
  cmask = _channel_mask(C, BC)
  h = _load(h0_ref, None, cmask)
  a_c = _load(a_ref, None, cmask) if a_const else None

  def time(s):                              # time index of scan step s
    return T - 1 - s if reverse else s

  def load_step(s):
    a = None if a_const else _load(a_ref, time(s), cmask)
    return a, _load(b_ref, time(s), cmask)

  def step(h, row, k, i):
    a_s, b_s = row
    h = (a_c if a_const else a_s) * h + b_s
    _store(h_ref, time(k * TT + i), h, cmask)
    return h

  h = _ring(T, TT, load_step, step, h)
  _store(hlast_ref, None, h, cmask)


def _bwd_kernel(a_ref, h_ref, h0_ref, g_ref, glast_ref, da_ref, db_ref, dh0_ref, *, T, C, BC,
                TT, reverse, a_const):
  """Walks the forward steps backwards: r = 0..T-1 is forward step T-1-r."""
  cmask = _channel_mask(C, BC)
  h0 = _load(h0_ref, None, cmask)
  c = _load(glast_ref, None, cmask)
  a_c = _load(a_ref, None, cmask) if a_const else None

  def time(r):                              # time index of backward step r
    return r if reverse else T - 1 - r

  def load_step(r):
    # h at the previous forward step, i.e. at the time of backward step r + 1.
    a = None if a_const else _load(a_ref, time(r), cmask)
    return a, _load(g_ref, time(r), cmask), _load(h_ref, time(r + 1), cmask)

  def step(carry, row, k, i):
    c, da_acc = carry
    a_r, g_r, hp_r = row
    r = k * TT + i
    lam = g_r + c
    _store(db_ref, time(r), lam, cmask)
    if a_const:
      da_acc = da_acc + lam * hp_r
    else:
      _store(da_ref, time(r), lam * hp_r, cmask)
    return (a_c if a_const else a_r) * lam, da_acc

  # The last step (forward step 0) reads h0, not h: it stays out of the ring so that the ring's
  # T - 1 steps are alike; its rows are loaded now, long before they are used.
  n = T - 1
  last = (None if a_const else _load(a_ref, time(n), cmask), _load(g_ref, time(n), cmask), h0)
  carry = _ring(n, TT, load_step, step, (c, jnp.zeros((BC,), jnp.float32)))
  c, da_acc = step(carry, last, n // TT, n % TT)        # r = n
  _store(dh0_ref, None, c, cmask)
  if a_const:
    _store(da_ref, None, da_acc, cmask)


def _specs(B, T, C, BC, a_const):
  full = pl.BlockSpec((None, T, BC), lambda i, j: (i, 0, j))
  row = pl.BlockSpec((None, BC), lambda i, j: (i, j))
  a_spec = pl.BlockSpec((BC,), lambda i, j: (j,)) if a_const else full
  return full, row, a_spec


def _forward(a, b, h0, reverse, interpret, config):
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
  B, T, C = h.shape
  a_const = a.ndim == 1
  BC, TT = config.bwd_block_c, config.bwd_time_chunk
  full, row, a_spec = _specs(B, T, C, BC, a_const)
  kernel = functools.partial(_bwd_kernel, T=T, C=C, BC=BC, TT=TT, reverse=reverse,
                             a_const=a_const)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scan(a, b, h0, reverse, interpret, config):
  return _forward(a, b, h0, reverse, interpret, config)


def _scan_fwd(a, b, h0, reverse, interpret, config):
  h, h_last = _forward(a, b, h0, reverse, interpret, config)
  return (h, h_last), (a, h, h0)


def _scan_bwd(reverse, interpret, config, res, cts):
  a, h, h0 = res
  g, g_last = cts
  da, db, dh0 = _backward(a, h, h0, g.astype(h.dtype), g_last.astype(jnp.float32), reverse,
                          interpret, config)
  return da, db.astype(h.dtype), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(a, b, h0, *, reverse, interpret, config):
  """Implementation 'pallas_triton' (called by ops.scan.api with validated f32 h0)."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if b.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"dtype {b.dtype} (supported: f32, bf16, f16)")
  if a.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"decay dtype {a.dtype}")
  if config is None:
    config = ScanConfig.for_device(None if interpret else _backend.device_kind())
  return _scan(a, b, h0, bool(reverse), interpret, config)
