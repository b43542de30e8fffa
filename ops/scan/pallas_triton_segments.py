"""Linear scan in parallel time segments (Pallas Triton, GPU): config.segment > 0 (forward),
config.bwd_segment > 0 (backward).

The serial kernels (pallas_triton.py) give one program all of time for its channels; at B=1
and 8192 channels that is 128 programs for 132 SMs, too few loads in flight to fill HBM. Here
one program owns `segment` (`bwd_segment`) scan steps of `block_c` (`bwd_block_c`) channels:
  forward:  loads its rows of a and b, folds them into h_out = M * h_in + N (M = prod a,
            N = the segment's scan from 0), waits for h_in from the segment before it,
            publishes h_out, then rescans its rows from h_in writing h;
  backward: loads its rows of a, g and the previous step's h, folds the cotangent carry
            c_out = M * c_in + N (c = a_s * lam_s, lam_s = g_s + c), waits for c_in from the
            segment after it, publishes c_out, then walks its steps writing db = lam and
            da = lam * h_{s-1} (per-channel a: one partial sum per segment, summed outside).
Traffic equals the serial kernels'. The hand-off between segments is ops/_triton_chain.py;
h_last (forward) and dh0 (backward) are the carries at the two ends of the chain.
Steps s = 0..T-1 are time t = s, or T-1-s when reverse.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops import _triton_chain as chain


def _time(s, T, reverse):
  return jnp.clip(T - 1 - s if reverse else s, 0, T - 1)


def _row(ref, b, s, T, reverse, mask):
  return plgpu.load(ref.at[b, _time(s, T, reverse), :], mask=mask, other=0).astype(jnp.float32)


def _program(counter_ref, B, BC, C):
  """(channel block, batch row, segment rank in chain order, channel mask) of this program."""
  j = pl.program_id(0)
  ticket = chain.take_ticket(counter_ref, j)
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  return ticket % B, ticket // B, cmask


def _chain_refs(refs, n_out, lookback):
  """Splits a kernel's trailing refs (chain state in, outputs, chain state out) into
  (outputs, counter ref, carry slots ref, segment maps ref or None)."""
  n_chain = 3 if lookback else 2
  outs = refs[n_chain:n_chain + n_out]
  counter_ref, buf_ref, *agg = refs[n_chain + n_out:]
  return outs, counter_ref, buf_ref, (agg[0] if lookback else None)


def _fwd_kernel(a_ref, b_ref, *refs, B, T, C, BC, S, n_seg, reverse, a_const, interpret,
                lookback):
  (h_ref,), counter_ref, buf_ref, agg_ref = _chain_refs(refs, 1, lookback)
  b, q, cmask = _program(counter_ref, B, BC, C)
  s0 = q * S
  a_c = plgpu.load(a_ref.at[:], mask=cmask, other=0).astype(jnp.float32) if a_const else None
  avals = [a_c if a_const else _row(a_ref, b, s0 + i, T, reverse, cmask & (s0 + i < T))
           for i in range(S)]
  bvals = [_row(b_ref, b, s0 + i, T, reverse, cmask & (s0 + i < T)) for i in range(S)]
  m = jnp.ones((BC,), jnp.float32)
  n = jnp.zeros((BC,), jnp.float32)
  for i in range(S):
    valid = s0 + i < T
    n = jnp.where(valid, avals[i] * n + bvals[i], n)
    m = jnp.where(valid, avals[i] * m, m)
  h = chain.receive(buf_ref, agg_ref, b, q, m, n, cmask, interpret, forward=True, n_seg=n_seg)
  chain.publish(buf_ref, (b, chain.out_slot(q, True), slice(None)), m * h + n, cmask, interpret)
  for i in range(S):
    s = s0 + i
    h = avals[i] * h + bvals[i]
    plgpu.store(h_ref.at[b, _time(s, T, reverse), :], h.astype(h_ref.dtype),
                mask=cmask & (s < T))


def _bwd_kernel(a_ref, h_ref, h0_ref, g_ref, *refs, B, T, C, BC, S, n_seg, reverse, a_const,
                interpret, lookback):
  (da_ref, db_ref), counter_ref, buf_ref, agg_ref = _chain_refs(refs, 2, lookback)
  b, rank, cmask = _program(counter_ref, B, BC, C)
  q = n_seg - 1 - rank                    # last segment first
  s0 = q * S
  a_c = plgpu.load(a_ref.at[:], mask=cmask, other=0).astype(jnp.float32) if a_const else None
  h0 = plgpu.load(h0_ref.at[b, :], mask=cmask, other=0).astype(jnp.float32)
  ok = [cmask & (s0 + i < T) for i in range(S)]
  avals = [a_c if a_const else _row(a_ref, b, s0 + i, T, reverse, ok[i]) for i in range(S)]
  gvals = [_row(g_ref, b, s0 + i, T, reverse, ok[i]) for i in range(S)]
  hprev = [_row(h_ref, b, s0 + i - 1, T, reverse, ok[i] & (s0 + i >= 1)) for i in range(S)]
  hprev[0] = jnp.where(s0 == 0, h0, hprev[0])
  m = jnp.ones((BC,), jnp.float32)
  n = jnp.zeros((BC,), jnp.float32)
  for i in reversed(range(S)):
    valid = s0 + i < T
    n = jnp.where(valid, avals[i] * (n + gvals[i]), n)
    m = jnp.where(valid, avals[i] * m, m)
  c = chain.receive(buf_ref, agg_ref, b, q, m, n, cmask, interpret, forward=False, n_seg=n_seg)
  chain.publish(buf_ref, (b, chain.out_slot(q, False), slice(None)), m * c + n, cmask,
                interpret)
  da_acc = jnp.zeros((BC,), jnp.float32)
  for i in reversed(range(S)):
    s = s0 + i
    valid = s < T
    lam = gvals[i] + c
    t = _time(s, T, reverse)
    plgpu.store(db_ref.at[b, t, :], lam.astype(db_ref.dtype), mask=ok[i])
    if a_const:
      da_acc = da_acc + jnp.where(valid, lam * hprev[i], 0.0)
    else:
      plgpu.store(da_ref.at[b, t, :], (lam * hprev[i]).astype(da_ref.dtype), mask=ok[i])
    c = jnp.where(valid, avals[i] * lam, c)
  if a_const:
    plgpu.store(da_ref.at[b, q, :], da_acc, mask=cmask)


def _specs(B, T, C, BC, a_const):
  full = pl.BlockSpec((B, T, BC), lambda j, k: (0, 0, j))
  a_spec = pl.BlockSpec((BC,), lambda j, k: (j,)) if a_const else full
  return full, a_spec


def forward(a, b, h0, reverse, interpret, config, compiler_params):
  """a: [B, T, C] or [C]; b: [B, T, C]; h0: [B, C] f32 -> (h [B, T, C] in b.dtype, h_last)."""
  B, T, C = b.shape
  a_const = a.ndim == 1
  BC, S = config.block_c, config.segment
  n_seg = pl.cdiv(T, S)
  full, a_spec = _specs(B, T, C, BC, a_const)
  state, state_specs, state_shapes = chain.operands(B, C, BC, n_seg, h0, forward=True,
                                                    lookback=config.lookback)
  kernel = functools.partial(_fwd_kernel, B=B, T=T, C=C, BC=BC, S=S, n_seg=n_seg,
                             reverse=reverse, a_const=a_const, interpret=interpret,
                             lookback=config.lookback)
  h, _, buf, *_ = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, C), b.dtype), *state_shapes),
      grid=(pl.cdiv(C, BC), B * n_seg),
      in_specs=[a_spec, full, *state_specs],
      out_specs=(full, *state_specs),
      # the chain state is updated in place (fresh arrays every call)
      input_output_aliases={2 + i: 1 + i for i in range(len(state))}, interpret=interpret,
      compiler_params=compiler_params, name="linear_scan_fwd_segments")(a, b, *state)
  return h, chain.as_float(buf[:, n_seg])


def backward(a, h, h0, g, g_last, reverse, interpret, config, compiler_params):
  """Cotangents of forward: (da like a, db [B, T, C] in h.dtype, dh0 [B, C] f32)."""
  B, T, C = h.shape
  a_const = a.ndim == 1
  BC, S = config.bwd_block_c, config.bwd_segment
  n_seg = pl.cdiv(T, S)
  full, a_spec = _specs(B, T, C, BC, a_const)
  state, state_specs, state_shapes = chain.operands(B, C, BC, n_seg, g_last, forward=False,
                                                    lookback=config.lookback)
  h0_spec = pl.BlockSpec((B, BC), lambda j, k: (0, j))
  if a_const:   # one partial sum of lam * h_prev per (batch row, segment)
    da_shape = jax.ShapeDtypeStruct((B, n_seg, C), jnp.float32)
    da_spec = pl.BlockSpec((B, n_seg, BC), lambda j, k: (0, 0, j))
  else:
    da_shape, da_spec = jax.ShapeDtypeStruct((B, T, C), a.dtype), full
  kernel = functools.partial(_bwd_kernel, B=B, T=T, C=C, BC=BC, S=S, n_seg=n_seg,
                             reverse=reverse, a_const=a_const, interpret=interpret,
                             lookback=config.lookback)
  da, db, _, buf, *_ = pl.pallas_call(
      kernel,
      out_shape=(da_shape, jax.ShapeDtypeStruct((B, T, C), h.dtype), *state_shapes),
      grid=(pl.cdiv(C, BC), B * n_seg),
      in_specs=[a_spec, full, h0_spec, full, *state_specs],
      out_specs=(da_spec, full, *state_specs),
      input_output_aliases={4 + i: 2 + i for i in range(len(state))}, interpret=interpret,
      compiler_params=compiler_params, name="linear_scan_bwd_segments")(
          a, h, h0, g, *state)
  if a_const:
    da = da.sum((0, 1)).astype(a.dtype)
  return da, db, chain.as_float(buf[:, 0])
