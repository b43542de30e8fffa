"""Leaky integrate-and-fire as Pallas Triton kernels (GPU).

Forward: grid = (batch, cdiv(channels, block_c)); each program walks all of time for its
channels with v in f32 registers, keeping `time_chunk` rows of x in flight (a prefetch ring,
fully unrolled: step s uses the row loaded one chunk earlier and issues the load of a later row
into the same slot). It writes spikes (x.dtype, exactly 0/1), v_last and, when a gradient will
be taken, the membrane state every `ckpt_every` steps (f32 [batch, ceil(T/ckpt_every),
channels]). With ~2 warps per SM the GPU cannot hide per-step overhead, so the main loop runs
over the T // time_chunk full chunks with no time mask, no select and no index clipping: during
full chunk k the ring is refilled with steps base_k .. base_k + time_chunk - 1, base_k =
min((k+1) * time_chunk, T - time_chunk), one clamp per chunk that keeps every prefetch in range
(the last full chunk reloads the final time_chunk steps; rows before the tail are unused). The
T % time_chunk remaining steps are unrolled after the loop; T is static, so they are static,
in range and unmasked too, and read their rows from the ring. Loop and tail share one per-step
helper. When block_c divides channels (static) no load or store carries a channel mask.

Backward (the choice documented in the brief): recompute instead of storing v_t. For each chunk
of `ckpt_every` steps, last chunk first, the kernel reloads the chunk's checkpoint, recomputes
the pre-clip potentials u_t from x in registers (same f32 ops as the forward, so spikes and
clip masks are bit-identical), then walks the chunk backwards:
  dw = dv * (1 - s) [hard] or dv [subtract]; ds_tot = ds_t (- w * dv [hard] or - threshold * dv
  [subtract] unless detach_reset); dw += ds_tot * g(w - threshold);
  du = dw * 1[v_min < u < v_max]; dx_t = du; dv = beta * du.
x and ds of the next chunk are prefetched while the current one runs. Only the last chunk (the
one holding step T-1, processed first) can be partial: when it is, it is peeled off before the
loop with its static number of steps, and the loop runs over the full chunks with no time mask
(its last iteration, chunk 0, prefetches chunk 0 again instead of chunk -1: one clamp per
chunk). Traffic: forward reads x and writes spikes (+ 1/ckpt_every of a row per step); backward
reads x and ds, writes dx — one fewer full-size array than saving v_t in the forward.
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
from ops.lif import reference
from ops.lif.config import LifConfig

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
  """Row t of a [rows, block_c] ref (t None: the whole [block_c] ref) as f32."""
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


def step_forward(v, x, p):
  """One LIF step in f32: returns (pre-clip u, new v, spike as bool)."""
  u = p["beta"] * v + x
  w = jnp.minimum(jnp.maximum(u, p["v_min"]), p["v_max"])
  s = (w - p["threshold"]) >= 0
  v = jnp.where(s, 0.0, w) if p["reset"] == "hard" else w - jnp.where(s, p["threshold"], 0.0)
  return u, v, s


def step_backward(u, ds, dv, p):
  """Gradient of one step: given u_t, dL/ds_t and dL/dv_t (post-reset), returns dL/du_t."""
  w = jnp.minimum(jnp.maximum(u, p["v_min"]), p["v_max"])
  z = w - p["threshold"]
  s = z >= 0
  if p["reset"] == "hard":
    dw = jnp.where(s, 0.0, dv)
    ds_tot = ds if p["detach_reset"] else ds - w * dv
  else:
    dw = dv
    ds_tot = ds if p["detach_reset"] else ds - p["threshold"] * dv
  dw = dw + ds_tot * reference.surrogate_grad(z, p["surrogate"], p["alpha"])
  inside = (u > p["v_min"]) & (u < p["v_max"])
  return jnp.where(inside, dw, 0.0)


def _fwd_kernel(x_ref, v0_ref, s_ref, vlast_ref, *ckpt, T, C, BC, TT, K, p):
  ckpt_ref = ckpt[0] if ckpt else None
  cmask = _channel_mask(C, BC)

  def step(v, x, k, i):
    if ckpt_ref is not None and i % K == 0:   # TT % K == 0: step k*TT + i starts a checkpoint
      _store(ckpt_ref, k * (TT // K) + i // K, v, cmask)
    _, v, spk = step_forward(v, x, p)
    _store(s_ref, k * TT + i, jnp.where(spk, 1.0, 0.0), cmask)
    return v

  v = _load(v0_ref, None, cmask)
  v = _ring(T, TT, lambda s: _load(x_ref, s, cmask), step, v)
  _store(vlast_ref, None, v, cmask)


def _bwd_kernel(x_ref, ckpt_ref, ds_ref, gv_ref, dx_ref, dv0_ref, *, T, C, BC, K, p):
  cmask = _channel_mask(C, BC)
  n_full, n_last = divmod(T, K)             # full chunks; steps of the partial last one

  def chunk(dv, v, xs, dss, q, n, nq):
    """The first n steps of chunk q, from its checkpoint v, x rows xs and ds rows dss; issues
    the loads of chunk nq (None: nothing left to prefetch) meanwhile. q, nq: static or traced;
    n: static. Returns (dv, checkpoint, x rows and ds rows of chunk nq)."""
    v_next = None if nq is None else _load(ckpt_ref, nq, cmask)
    us, new_x = [], []
    for i in range(K):                      # recompute the chunk forward
      if i < n:
        u, v, _ = step_forward(v, xs[i], p)
        us.append(u)
      if nq is not None:
        new_x.append(_load(x_ref, nq * K + i, cmask))
    new_ds = [None] * K
    for i in reversed(range(K)):            # and walk it backwards
      if nq is not None:
        new_ds[i] = _load(ds_ref, nq * K + i, cmask)
      if i < n:
        du = step_backward(us[i], dss[i], dv, p)
        _store(dx_ref, q * K + i, du, cmask)
        dv = p["beta"] * du
    return dv, v_next, tuple(new_x), tuple(new_ds)

  def load_chunk(q, n):
    return (_load(ckpt_ref, q, cmask), tuple(_load(x_ref, q * K + i, cmask) for i in range(n)),
            tuple(_load(ds_ref, q * K + i, cmask) for i in range(n)))

  dv = _load(gv_ref, None, cmask)
  if n_last:                                # peeled: the partial chunk, T - n_last .. T - 1
    v, xs, dss = load_chunk(n_full, n_last)
    dv, v, xs, dss = chunk(dv, v, xs, dss, n_full, n_last, n_full - 1 if n_full else None)
  else:
    v, xs, dss = load_chunk(n_full - 1, K)

  def body(m, carry):                       # full chunks q = n_full - 1 .. 0
    dv, v, xs, dss = carry
    q = n_full - 1 - m
    # Prefetch chunk q - 1; for q = 0 reload chunk 0 (in range, unused) instead of masking.
    return chunk(dv, v, xs, dss, q, K, jnp.maximum(q - 1, 0))

  if n_full:
    dv, *_ = lax.fori_loop(0, n_full, body, (dv, v, xs, dss))
  _store(dv0_ref, None, dv, cmask)


def _forward(x, v0, p, save_ckpt, interpret, config):
  B, T, C = x.shape
  BC, TT, K = config.block_c, config.time_chunk, config.ckpt_every
  full = pl.BlockSpec((None, T, BC), lambda i, j: (i, 0, j))
  row = pl.BlockSpec((None, BC), lambda i, j: (i, j))
  out_shape = [jax.ShapeDtypeStruct((B, T, C), x.dtype), jax.ShapeDtypeStruct((B, C), jnp.float32)]
  out_specs = [full, row]
  n_ck = pl.cdiv(T, K)
  if save_ckpt:
    out_shape.append(jax.ShapeDtypeStruct((B, n_ck, C), jnp.float32))
    out_specs.append(pl.BlockSpec((None, n_ck, BC), lambda i, j: (i, 0, j)))
  kernel = functools.partial(_fwd_kernel, T=T, C=C, BC=BC, TT=TT, K=K, p=p)
  return pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(B, pl.cdiv(C, BC)),
      in_specs=[full, row], out_specs=tuple(out_specs), interpret=interpret,
      compiler_params=_compiler_params(config.num_warps, config.num_stages),
      name="lif_fwd")(x, v0)


def _backward(x, ckpt, ds, gv, p, interpret, config):
  B, T, C = x.shape
  BC, K = config.bwd_block_c, config.ckpt_every
  n_ck = ckpt.shape[1]
  full = pl.BlockSpec((None, T, BC), lambda i, j: (i, 0, j))
  row = pl.BlockSpec((None, BC), lambda i, j: (i, j))
  kernel = functools.partial(_bwd_kernel, T=T, C=C, BC=BC, K=K, p=p)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, C), x.dtype),
                 jax.ShapeDtypeStruct((B, C), jnp.float32)),
      grid=(B, pl.cdiv(C, BC)),
      in_specs=[full, pl.BlockSpec((None, n_ck, BC), lambda i, j: (i, 0, j)), full, row],
      out_specs=(full, row), interpret=interpret,
      compiler_params=_compiler_params(config.bwd_num_warps, config.num_stages),
      name="lif_bwd")(x, ckpt, ds, gv)


def _params(pt):
  return dict(pt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lif(x, v0, pt, interpret, config):
  s, v_last = _forward(x, v0, _params(pt), False, interpret, config)
  return s, v_last


def _lif_fwd(x, v0, pt, interpret, config):
  s, v_last, ckpt = _forward(x, v0, _params(pt), True, interpret, config)
  return (s, v_last), (x, ckpt)


def _lif_bwd(pt, interpret, config, res, cts):
  x, ckpt = res
  ds, gv = cts
  dx, dv0 = _backward(x, ckpt, ds.astype(x.dtype), gv.astype(jnp.float32), _params(pt),
                      interpret, config)
  return dx, dv0


_lif.defvjp(_lif_fwd, _lif_bwd)


def lif(x, v0, *, params, interpret, config):
  """Implementation 'pallas_triton'; `params` is a sorted tuple of (name, value) pairs."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if x.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"dtype {x.dtype} (supported: f32, bf16, f16)")
  if config is None:
    config = LifConfig.for_device(None if interpret else _backend.device_kind())
  return _lif(x, v0, params, interpret, config)
