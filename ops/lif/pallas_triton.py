"""Leaky integrate-and-fire as Pallas Triton kernels (GPU).

Forward: grid = (batch, cdiv(channels, block_c)); each program walks all of time for its
channels with v in f32 registers, keeping prefetch_chunks * time_chunk rows of x in flight (a
prefetch ring, its time_chunk steps unrolled: step s uses the row loaded that many steps earlier
and issues the load of row s + prefetch_chunks * time_chunk). It writes spikes (x.dtype, exactly
0/1), v_last and, when a gradient will be taken, the membrane state every `ckpt_every` steps
(f32 [batch, ceil(T/ckpt_every), channels]).

Backward (the choice documented in the brief): recompute instead of storing v_t. For each chunk
of `ckpt_every` steps, last chunk first, the kernel reloads the chunk's checkpoint, recomputes
the pre-clip potentials u_t from x in registers (same f32 ops as the forward, so spikes and
clip masks are bit-identical), then walks the chunk backwards:
  dw = dv * (1 - s) [hard] or dv [subtract]; ds_tot = ds_t (- w * dv [hard] or - threshold * dv
  [subtract] unless detach_reset); dw += ds_tot * g(w - threshold);
  du = dw * 1[v_min < u < v_max]; dx_t = du; dv = beta * du.
x and ds of the next chunk are prefetched while the current one runs. Traffic: forward reads x
and writes spikes (+ 1/ckpt_every of a row per step); backward reads x and ds, writes dx —
one fewer full-size array than saving v_t in the forward.
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
from ops.lif import pallas_triton_bwd_replay, pallas_triton_fwd_segments, pallas_triton_segments
from ops.lif.config import LifConfig
from ops.lif.steps import step_backward, step_forward
from ops.lif.vjp import with_vjp

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _compiler_params(num_warps, num_stages):
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _load_row(ref, t, mask, T):
  return plgpu.load(ref.at[jnp.clip(t, 0, T - 1), :], mask=mask, other=0).astype(jnp.float32)


def _fwd_kernel(x_ref, v0_ref, s_ref, vlast_ref, *ckpt, T, C, BC, TT, K, P, p):
  ckpt_ref = ckpt[0] if ckpt else None
  j = pl.program_id(1)
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C

  def load(s):
    return _load_row(x_ref, s, cmask & (s < T), T)

  v = plgpu.load(v0_ref.at[:], mask=cmask, other=0).astype(jnp.float32)
  # P chunks of TT rows in flight: the body consumes the oldest and loads the one P chunks on
  # (the unrolled body stays TT steps long whatever P)
  bufs = tuple(tuple(load(jnp.int32(c * TT + i)) for i in range(TT)) for c in range(P))

  def body(k, carry):
    v, bufs = carry
    xbuf = bufs[0]
    new_x = []
    for i in range(TT):
      s = k * TT + i
      valid = s < T
      x_i = xbuf[i]
      new_x.append(load(s + P * TT))
      if ckpt_ref is not None and i % K == 0:
        row = k * (TT // K) + i // K
        plgpu.store(ckpt_ref.at[jnp.clip(row, 0, ckpt_ref.shape[0] - 1), :], v,
                    mask=cmask & valid)
      _, v_new, spk = step_forward(v, x_i, p)
      spikes = jnp.where(spk, 1.0, 0.0).astype(s_ref.dtype)
      plgpu.store(s_ref.at[jnp.clip(s, 0, T - 1), :], spikes, mask=cmask & valid)
      v = jnp.where(valid, v_new, v)
    return v, bufs[1:] + (tuple(new_x),)

  v, _ = lax.fori_loop(0, pl.cdiv(T, TT), body, (v, bufs))
  plgpu.store(vlast_ref.at[:], v, mask=cmask)


def _bwd_kernel(x_ref, ckpt_ref, ds_ref, gv_ref, dx_ref, dv0_ref, *, T, C, BC, K, p):
  j = pl.program_id(1)
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  n_chunks = pl.cdiv(T, K)

  def load_chunk(ref, q):
    ok = q >= 0
    return tuple(_load_row(ref, q * K + i, cmask & ok & (q * K + i < T), T) for i in range(K))

  def load_ckpt(q):
    return plgpu.load(ckpt_ref.at[jnp.clip(q, 0, n_chunks - 1), :], mask=cmask & (q >= 0),
                      other=0)

  dv = plgpu.load(gv_ref.at[:], mask=cmask, other=0).astype(jnp.float32)
  q_last = n_chunks - 1
  carry = (dv, load_ckpt(q_last), load_chunk(x_ref, q_last), load_chunk(ds_ref, q_last))

  def body(n, carry):
    dv, v, xbuf, dsbuf = carry
    q = q_last - n
    nq = q - 1
    v_next = load_ckpt(nq)
    us, new_x = [], []
    for i in range(K):                      # recompute the chunk forward
      u, v, _ = step_forward(v, xbuf[i], p)
      us.append(u)
      t = nq * K + i
      new_x.append(_load_row(x_ref, t, cmask & (nq >= 0) & (t < T), T))
    new_ds = [None] * K
    for i in reversed(range(K)):            # and walk it backwards
      t = q * K + i
      valid = t < T
      tn = nq * K + i
      new_ds[i] = _load_row(ds_ref, tn, cmask & (nq >= 0) & (tn < T), T)
      du = step_backward(us[i], dsbuf[i], dv, p)
      plgpu.store(dx_ref.at[jnp.clip(t, 0, T - 1), :], du.astype(dx_ref.dtype),
                  mask=cmask & valid)
      dv = jnp.where(valid, p["beta"] * du, dv)
    return dv, v_next, tuple(new_x), tuple(new_ds)

  dv, *_ = lax.fori_loop(0, n_chunks, body, carry)
  plgpu.store(dv0_ref.at[:], dv, mask=cmask)


def _forward(x, v0, p, save_ckpt, interpret, config):
  if config.segment:
    return pallas_triton_fwd_segments.forward(
        x, v0, p, save_ckpt, interpret, config,
        _compiler_params(config.num_warps, config.num_stages))
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
  kernel = functools.partial(_fwd_kernel, T=T, C=C, BC=BC, TT=TT, K=K,
                             P=config.prefetch_chunks, p=p)
  return pl.pallas_call(
      kernel, out_shape=tuple(out_shape), grid=(B, pl.cdiv(C, BC)),
      in_specs=[full, row], out_specs=tuple(out_specs), interpret=interpret,
      compiler_params=_compiler_params(config.num_warps, config.num_stages),
      name="lif_fwd")(x, v0)


def _backward(x, ckpt, ds, gv, p, interpret, config):
  if config.bwd_replay and pallas_triton_bwd_replay.applies(p):
    return pallas_triton_bwd_replay.backward(
        x, ckpt, ds, gv, p, interpret, config,
        _compiler_params(config.bwd_replay_num_warps, config.num_stages))
  if config.bwd_segment:
    return pallas_triton_segments.backward(
        x, ckpt, ds, gv, p, interpret, config,
        _compiler_params(config.bwd_num_warps, config.num_stages))
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


_lif = with_vjp(_forward, _backward)


def lif(x, v0, *, params, interpret, config):
  """Implementation 'pallas_triton'; `params` is a sorted tuple of (name, value) pairs."""
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  if x.dtype not in [jnp.dtype(d) for d in _DTYPES]:
    raise UnsupportedError(f"dtype {x.dtype} (supported: f32, bf16, f16)")
  if config is None:
    config = LifConfig.for_device(None if interpret else _backend.device_kind())
  if config.lookback and config.bwd_segment and not interpret:
    # H200, jax 0.11.2 (session 12): compiling the look-back backward segfaulted in the
    # Triton compiler (the chained hand-off compiles and runs). Interpret mode only, for now.
    raise UnsupportedError("LifConfig.lookback: the look-back backward crashes the Triton "
                           "compiler (jax 0.11.2); interpret mode only")
  p = dict(params)
  if (config.fixup_merge and config.bwd_replay and config.bwd_replay_prefetch
      and pallas_triton_bwd_replay.applies(p) and not interpret):
    # H200, jax 0.11.2 (session 18): compiling the replay backward's merge-stop walk with
    # prefetched rows segfaulted in the Triton compiler (twice); the segment forward's merge
    # walk compiles and runs. Without prefetch it is untried on the GPU.
    raise UnsupportedError("LifConfig.fixup_merge with the prefetched replay backward crashes "
                           "the Triton compiler (jax 0.11.2): set bwd_replay_prefetch=False, "
                           "bwd_replay=0 or fixup_merge=False")
  return _lif(x, v0, params, interpret, config)
