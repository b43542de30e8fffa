"""LIF backward as time segments run in parallel (Pallas Triton, GPU): config.bwd_segment > 0.

The serial backward (pallas_triton._bwd_kernel) walks all of time in one program per channel
block; at B=1 it has 2 warps per SM and spends ~3x the HBM time of its traffic. Given the
pre-clip potentials u_t, the backward is affine in the membrane gradient:
  du_t = A_t * dv_t + G_t * ds_t,   dv_{t-1} = beta * du_t,   dx_t = du_t,
with A_t, G_t functions of u_t alone (ops/lif/steps.py). So each segment of S steps
(S a multiple of ckpt_every, starting at a checkpoint) is one program that
  1. loads its S rows of x and ds (all loads in flight at once),
  2. recomputes u_t from the checkpoint, forms A_t and G_t * ds_t (registers, 2 per step),
  3. folds them, last step first, into dv_out = M * dv_in + N,
  4. waits for dv_in from the segment after it, publishes dv_out for the one before it
     (ops/_triton_chain.py: the only serial part, one hop per segment),
  5. walks its steps backwards with the true dv_in and writes dx.
Traffic is the serial kernel's: x and ds read once, dx written once. dv0 is the carry the
first segment publishes. grid = (channel blocks, batch x segments); tickets order a channel
block's programs last segment first.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops import _triton_chain as chain
from ops.lif.steps import step_coefficients, step_forward


def _kernel(x_ref, ckpt_ref, ds_ref, *refs, B, T, C, BC, S, K, n_seg, p, interpret, lookback):
  n_chain = 3 if lookback else 2           # counter, carry slots (, segment maps): in, out
  dx_ref = refs[n_chain]
  counter_ref, buf_ref, *agg = refs[n_chain + 1:]
  agg_ref = agg[0] if lookback else None
  j = pl.program_id(0)
  ticket = chain.take_ticket(counter_ref, j)
  b = ticket % B
  q = n_seg - 1 - ticket // B              # last segment first
  t0 = q * S
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C

  def row(ref, i):
    t = t0 + i
    return plgpu.load(ref.at[b, jnp.minimum(t, T - 1), :], mask=cmask & (t < T),
                      other=0).astype(jnp.float32)

  v = plgpu.load(ckpt_ref.at[b, q * (S // K), :], mask=cmask, other=0)
  xs = [row(x_ref, i) for i in range(S)]
  dss = [row(ds_ref, i) for i in range(S)]
  coef_a, coef_n = [], []
  for i in range(S):
    u, v, _ = step_forward(v, xs[i], p)
    a, g = step_coefficients(u, p)
    coef_a.append(a)
    coef_n.append(g * dss[i])

  m = jnp.ones((BC,), jnp.float32)
  n = jnp.zeros((BC,), jnp.float32)
  for i in reversed(range(S)):
    valid = t0 + i < T
    n = jnp.where(valid, p["beta"] * (coef_a[i] * n + coef_n[i]), n)
    m = jnp.where(valid, p["beta"] * coef_a[i] * m, m)

  dv = chain.receive(buf_ref, agg_ref, b, q, m, n, cmask, interpret, forward=False,
                     n_seg=n_seg)
  chain.publish(buf_ref, (b, chain.out_slot(q, False), slice(None)), m * dv + n, cmask,
                interpret)

  for i in reversed(range(S)):
    t = t0 + i
    valid = t < T
    du = coef_a[i] * dv + coef_n[i]
    plgpu.store(dx_ref.at[b, jnp.minimum(t, T - 1), :], du.astype(dx_ref.dtype),
                mask=cmask & valid)
    dv = jnp.where(valid, p["beta"] * du, dv)


def backward(x, ckpt, ds, gv, p, interpret, config, compiler_params):
  """x, ds: [batch, time, channels]; ckpt: [batch, ceil(T/ckpt_every), channels] f32 (v before
  every ckpt_every-th step); gv: [batch, channels] f32. Returns (dx in x.dtype, dv0 f32)."""
  B, T, C = x.shape
  BC, S, K = config.bwd_block_c, config.bwd_segment, config.ckpt_every
  n_seg = pl.cdiv(T, S)
  full = pl.BlockSpec((B, T, BC), lambda j, k: (0, 0, j))
  state, state_specs, state_shapes = chain.operands(B, C, BC, n_seg, gv, forward=False,
                                                    lookback=config.lookback)
  kernel = functools.partial(_kernel, B=B, T=T, C=C, BC=BC, S=S, K=K, n_seg=n_seg, p=p,
                             interpret=interpret, lookback=config.lookback)
  dx, _, buf, *_ = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, C), x.dtype), *state_shapes),
      grid=(pl.cdiv(C, BC), B * n_seg),
      in_specs=[full, pl.BlockSpec((B, ckpt.shape[1], BC), lambda j, k: (0, 0, j)), full,
                *state_specs],
      out_specs=(full, *state_specs),
      # the chain state is updated in place (fresh arrays every call)
      input_output_aliases={3 + i: 1 + i for i in range(len(state))}, interpret=interpret,
      compiler_params=compiler_params, name="lif_bwd_segments")(x, ckpt, ds, *state)
  return dx, chain.as_float(buf[:, 0])
