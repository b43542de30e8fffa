"""LIF forward as time segments run in parallel from replayed start states (Pallas Triton,
GPU): config.segment > 0.

The serial forward (pallas_triton._fwd_kernel) gives one program all of time for its channels:
at B=1, C=8192 that is 256 one-warp programs of 32 channels for 132 SMs (H200: 61-66% of copy),
and wider programs would leave SMs idle. Segments give B * T / S * C / block_c programs, so
block_c can grow: what made this faster on the H200 was 64-256 channels per program (wider rows
of x per access), not the extra programs as such (at 32 channels the first pass alone ran at
the serial kernel's speed; session 16). The step is not associative (threshold, reset,
clamp), so the scan's segment fold does not apply. But two LIF trajectories fed the same x
coalesce: a spike both take (hard reset), a clamp both hit, or the leak shrinking their
difference below one rounding step makes them bit-identical, and from there on they stay
identical. So:
  pass    one program per (batch row, S-step segment, channel block) replays the last W steps
          of the segment before it from rest (v = 0) to guess its start state, then walks its
          own S steps from the guess, writing spikes, checkpoints, its end state and the start
          it used. Segment 0 starts from v0. All programs run at once.
  check   every segment's start equals the end of the segment before it, channel by channel:
          then, by induction from segment 0, every start is the true one and the output is
          exactly the serial forward's (same f32 steps, ops/lif/steps.py).
  fix-up  otherwise a while loop re-runs, in place, only the channel blocks of segments whose
          start disagrees, now from the previous segment's end, until the check holds. Pass i
          makes segment i exact, so it ends after at most n_seg - 1 passes.
On the bench input (x ~ 1.2 N(0, 1), beta 0.95, hard reset, a 10% spike rate) trajectories
from 0 and from the true state agree after 5 steps (median; max over a 32-channel block: median
22, p99 45 in a CPU simulation), yet on the H200 W = 64 still left a few channel-segment
boundaries of B1 T8192 C8192 wrong at S 128-512 (one fix-up pass, +0.03-0.05 ms) and W = 128
none. At a 3.6% spike rate
(x ~ 0.5 N(0, 1)) a third of 32-channel blocks need more than 128 steps. Weak input, subtract
reset or W = 0 merge later and pay fix-up passes; the result is exact either way. Timings:
LifConfig's docstring.
Traffic: x read 1 + W / S times, spikes written once, plus what fix-ups re-run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops.lif.steps import step_forward


def _row(x_ref, b, t, mask, T):
  return plgpu.load(x_ref.at[b, jnp.clip(t, 0, T - 1), :], mask=mask,
                    other=0).astype(jnp.float32)


def _walk(x_ref, b, v, first, n_rows, cmask, *, T, TT, K, p, s_ref=None, ckpt_ref=None):
  """Steps rows first .. first + n_rows - 1 of batch row b (n_rows a multiple of TT; rows >= T
  are no-ops) from v, one chunk of TT rows in flight; writes spikes / checkpoints where refs
  are given."""

  n_chunks = n_rows // TT

  def load(c):       # the chunk after the last is masked off: no traffic
    ok = cmask & (c < n_chunks)
    return tuple(_row(x_ref, b, first + c * TT + i, ok & (first + c * TT + i < T), T)
                 for i in range(TT))

  def body(c, carry):
    v, xbuf = carry
    nxt = load(c + 1)
    for i in range(TT):
      s = first + c * TT + i
      valid = s < T
      if ckpt_ref is not None and s_ref is not None and i % K == 0:
        row = jnp.clip(s // K, 0, ckpt_ref.shape[1] - 1)
        plgpu.store(ckpt_ref.at[b, row, :], v, mask=cmask & valid)
      _, v_new, spk = step_forward(v, xbuf[i], p)
      if s_ref is not None:
        plgpu.store(s_ref.at[b, jnp.clip(s, 0, T - 1), :],
                    jnp.where(spk, 1.0, 0.0).astype(s_ref.dtype), mask=cmask & valid)
      v = jnp.where(valid, v_new, v)
    return v, nxt

  v, _ = lax.fori_loop(0, n_chunks, body, (v, load(0)))
  return v


def differs(a, b):
  """Elementwise a != b with NaN equal to NaN (what the check outside the kernel uses)."""
  return (a != b) & ~((a != a) & (b != b))


def _kernel(x_ref, v0_ref, *refs, B, T, C, BC, S, TT, K, W, n_seg, p, replay, save_ckpt):
  """replay=True: the first pass (starts guessed by replaying W steps). replay=False: a
  fix-up pass; extra inputs end_prev, used_prev [B, n_seg, BC] and the spikes / checkpoints
  it updates in place."""
  if replay:
    s_ref, end_ref, used_ref, *ck = refs
  else:
    end_prev_ref, used_prev_ref, _, *rest = refs
    rest = rest[1:] if save_ckpt else rest        # the aliased checkpoint input
    s_ref, end_ref, used_ref, *ck = rest
  ckpt_ref = ck[0] if save_ckpt else None
  j = pl.program_id(0)
  b = pl.program_id(1) // n_seg
  q = pl.program_id(1) % n_seg
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  v0 = plgpu.load(v0_ref.at[b, :], mask=cmask, other=0).astype(jnp.float32)
  walk = functools.partial(_walk, x_ref, b, T=T, TT=TT, K=K, p=p)
  out = lambda ref, val: plgpu.store(ref.at[b, q, :], val, mask=cmask)

  if replay:
    if W:
      guess = walk(jnp.zeros((BC,), jnp.float32), q * S - W, W, cmask & (q > 0))
    else:
      guess = jnp.zeros((BC,), jnp.float32)
    start = jnp.where(q == 0, v0, guess)
    out(used_ref, start)
    out(end_ref, walk(start, q * S, S, cmask, s_ref=s_ref, ckpt_ref=ckpt_ref))
    return

  prev_end = plgpu.load(end_prev_ref.at[b, jnp.maximum(q - 1, 0), :], mask=cmask, other=0)
  start = jnp.where(q == 0, v0, prev_end)
  used = plgpu.load(used_prev_ref.at[b, q, :], mask=cmask, other=0)
  redo = jnp.max(jnp.where(differs(start, used) & cmask, 1, 0)) > 0
  out(used_ref, start)

  @pl.when(redo)
  def _():
    out(end_ref, walk(start, q * S, S, cmask, s_ref=s_ref, ckpt_ref=ckpt_ref))

  @pl.when(~redo)
  def _():
    out(end_ref, plgpu.load(end_prev_ref.at[b, q, :], mask=cmask, other=0))


def consistent(end, used):
  """Whether every segment started from the end of the one before it (NaN equals NaN).
  end, used: [batch, n_seg, channels] f32."""
  return ~jnp.any(differs(used[:, 1:], end[:, :-1]))


def forward(x, v0, p, save_ckpt, interpret, config, compiler_params):
  """x: [B, T, C]; v0: [B, C] f32 -> (spikes [B, T, C] in x.dtype, v_last [B, C] f32[,
  checkpoints [B, ceil(T / ckpt_every), C] f32 when save_ckpt])."""
  return run(x, v0, p, save_ckpt, interpret, config, compiler_params)[0]


def run(x, v0, p, save_ckpt, interpret, config, compiler_params, max_fixups=None):
  """forward's outputs and the number of fix-up passes it ran (int32 scalar). max_fixups
  caps the passes (benchmarks time the first pass alone with 0; the output may then be
  inexact)."""
  B, T, C = x.shape
  BC, S, TT, K, W = (config.block_c, config.segment, config.segment_chunk, config.ckpt_every,
                     config.segment_replay)
  n_seg = pl.cdiv(T, S)
  n_ck = pl.cdiv(T, K)
  full = pl.BlockSpec((B, T, BC), lambda j, k: (0, 0, j))
  row = pl.BlockSpec((B, BC), lambda j, k: (0, j))
  seg = pl.BlockSpec((B, n_seg, BC), lambda j, k: (0, 0, j))
  ck_spec = pl.BlockSpec((B, n_ck, BC), lambda j, k: (0, 0, j))
  seg_shape = jax.ShapeDtypeStruct((B, n_seg, C), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct((B, T, C), x.dtype), seg_shape, seg_shape]
  out_specs = [full, seg, seg]
  if save_ckpt:
    out_shape.append(jax.ShapeDtypeStruct((B, n_ck, C), jnp.float32))
    out_specs.append(ck_spec)
  kw = dict(B=B, T=T, C=C, BC=BC, S=S, TT=TT, K=K, W=W, n_seg=n_seg, p=p, save_ckpt=save_ckpt)
  call = functools.partial(pl.pallas_call, out_shape=tuple(out_shape),
                           grid=(pl.cdiv(C, BC), B * n_seg), out_specs=tuple(out_specs),
                           interpret=interpret, compiler_params=compiler_params)
  s, end, used, *ck = call(functools.partial(_kernel, replay=True, **kw),
                           in_specs=[full, row], name="lif_fwd_segments")(x, v0)

  fix = call(functools.partial(_kernel, replay=False, **kw),
             in_specs=[full, row, seg, seg, full] + ([ck_spec] if save_ckpt else []),
             # spikes and checkpoints are rewritten in place, only for re-run segments
             input_output_aliases={4: 0, **({5: 3} if save_ckpt else {})},
             name="lif_fwd_segments_fixup")
  (s, end, _, *ck), n = until_consistent(
      lambda s, end, used, *ck: fix(x, v0, end, used, s, *ck), (s, end, used, *ck),
      lambda s, end, used, *ck: consistent(end, used), n_seg, max_fixups)
  return (s, end[:, -1], *ck), n


def until_consistent(fix, state, ok, n_seg, max_fixups=None):
  """Runs state = fix(*state) while not ok(*state), at most n_seg - 1 times (max_fixups
  caps it further). Returns (state, passes run as an int32 scalar)."""
  limit = n_seg - 1 if max_fixups is None else min(max_fixups, n_seg - 1)

  def cond(carry):
    n, state = carry
    return (n < limit) & ~ok(*state)

  def body(carry):
    n, state = carry
    return n + 1, tuple(fix(*state))

  n, state = lax.while_loop(cond, body, (jnp.int32(0), tuple(state)))
  return state, n
