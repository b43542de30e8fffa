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
          makes segment i exact, so it ends after at most n_seg - 1 passes. With
          config.fixup_merge a re-run stops at the first chunk whose starting state equals
          the checkpoint the earlier walk stored there (the trajectories have merged), so a
          wrong start costs the steps until they merge, not the whole segment; the
          checkpoints are then written in inference too.
On the bench input (x ~ 1.2 N(0, 1), beta 0.95, hard reset, a 10% spike rate) trajectories
from 0 and from the true state agree after 5 steps (median; max over a 32-channel block: median
22, p99 45 in a CPU simulation), yet on the H200 W = 64 still left a few channel-segment
boundaries of B1 T8192 C8192 wrong at S 128-512 (one fix-up pass, +0.03-0.05 ms) and W = 128
none. At a 3.6% spike rate
(x ~ 0.5 N(0, 1)) a third of 32-channel blocks need more than 128 steps. Weak input, subtract
reset or W = 0 merge later and pay fix-up passes; the result is exact either way. Timings:
LifConfig's docstring.
Traffic: x read 1 + W / S times, spikes written once, checkpoints (1 / ckpt_every of an f32
row per step) written once when kept, plus what fix-ups re-run.
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


def _walk(x_ref, b, v, first, n_rows, cmask, *, T, TT, K, p, s_ref=None, ckpt_ref=None,
          check=False):
  """Steps rows first .. first + n_rows - 1 of batch row b (n_rows a multiple of TT; rows >= T
  are no-ops) from v, one chunk of TT rows in flight; writes spikes / checkpoints where refs
  are given. check=True (a fix-up walk, first a multiple of TT): before each chunk after the
  first, the state is compared with the checkpoint an earlier walk stored there, and the walk
  stops where they agree on every channel (the two trajectories have merged: everything from
  there on is already what this walk would write). Returns (the state after the last step,
  whether the walk stopped early; then that state is the earlier walk's, not recomputed)."""

  n_chunks = n_rows // TT

  def load(c):       # the chunk after the last is masked off: no traffic
    ok = cmask & (c < n_chunks)
    return tuple(_row(x_ref, b, first + c * TT + i, ok & (first + c * TT + i < T), T)
                 for i in range(TT))

  def merged(c, v):  # whether v, the state before chunk c, is what an earlier walk stored
    s0 = first + c * TT
    never = c < 0    # a traced False: the Triton lowering yields no literal constants
    if not check:
      return never
    old = plgpu.load(ckpt_ref.at[b, jnp.clip(s0 // K, 0, ckpt_ref.shape[1] - 1), :],
                     mask=cmask, other=0)
    return (c < n_chunks) & (s0 < T) & agree(v, old, cmask)

  def steps(c, v, xbuf):
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

  c0 = jnp.int32(0)
  if not check:          # a fixed trip count (the loop the GPU runs have timed)
    v, _ = lax.fori_loop(0, n_chunks, lambda c, st: steps(c, *st), (v, load(c0)))
    return v, c0 < 0

  def cond(state):
    return (state[0] < n_chunks) & ~state[3]

  def body(state):
    c, v, xbuf, _ = state
    v, nxt = steps(c, v, xbuf)
    return c + 1, v, nxt, merged(c + 1, v)

  _, v, _, stopped = lax.while_loop(cond, body, (c0, v, load(c0), c0 < 0))
  return v, stopped


def differs(a, b):
  """Elementwise a != b with NaN equal to NaN (what the check outside the kernel uses)."""
  return (a != b) & ~((a != a) & (b != b))


def agree(a, b, cmask):
  """In a kernel: whether a and b [BC] agree on every channel of cmask (a scalar bool)."""
  return jnp.max(jnp.where(differs(a, b) & cmask, 1, 0)) == 0


def _kernel(x_ref, v0_ref, *refs, B, T, C, BC, S, TT, K, W, n_seg, p, replay, save_ckpt,
            merge):
  """replay=True: the first pass (starts guessed by replaying W steps). replay=False: a
  fix-up pass; extra inputs end_prev, used_prev [B, n_seg, BC] and the spikes / checkpoints
  it updates in place. The checkpoints are written when the caller wants them or fix-ups
  compare against them (merge); else not at all."""
  if replay:
    s_ref, end_ref, used_ref, ckpt_ref = refs
  else:
    end_prev_ref, used_prev_ref, _, _, s_ref, end_ref, used_ref, ckpt_ref = refs
  ckpt_ref = ckpt_ref if save_ckpt or merge else None
  j = pl.program_id(0)
  b = pl.program_id(1) // n_seg
  q = pl.program_id(1) % n_seg
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  v0 = plgpu.load(v0_ref.at[b, :], mask=cmask, other=0).astype(jnp.float32)
  walk = functools.partial(_walk, x_ref, b, T=T, TT=TT, K=K, p=p)
  out = lambda ref, val: plgpu.store(ref.at[b, q, :], val, mask=cmask)
  own = lambda v, check: walk(v, q * S, S, cmask, s_ref=s_ref, ckpt_ref=ckpt_ref,
                             check=check and merge)

  if replay:
    if W:
      guess = walk(jnp.zeros((BC,), jnp.float32), q * S - W, W, cmask & (q > 0))[0]
    else:
      guess = jnp.zeros((BC,), jnp.float32)
    start = jnp.where(q == 0, v0, guess)
    out(used_ref, start)
    out(end_ref, own(start, False)[0])
    return

  prev_end = plgpu.load(end_prev_ref.at[b, jnp.maximum(q - 1, 0), :], mask=cmask, other=0)
  start = jnp.where(q == 0, v0, prev_end)
  used = plgpu.load(used_prev_ref.at[b, q, :], mask=cmask, other=0)
  redo = ~agree(start, used, cmask)
  out(used_ref, start)
  end_prev = plgpu.load(end_prev_ref.at[b, q, :], mask=cmask, other=0)

  @pl.when(redo)
  def _():
    v, stopped = own(start, True)
    out(end_ref, jnp.where(stopped, end_prev, v))

  @pl.when(~redo)
  def _():
    out(end_ref, end_prev)


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
  state = first_pass(x, v0, p, save_ckpt, interpret, config, compiler_params)
  (s, end, _, ckpt), n = until_consistent(
      lambda *st: fix_up_pass(x, v0, st, p, save_ckpt, interpret, config, compiler_params),
      state,
      lambda s, end, used, ckpt: consistent(end, used), pl.cdiv(x.shape[1], config.segment),
      max_fixups)
  return (s, end[:, -1], *((ckpt,) if save_ckpt else ())), n


def _call(x, config, compiler_params, interpret, **kw):
  B, T, C = x.shape
  BC, S, TT, K, W = (config.block_c, config.segment, config.segment_chunk, config.ckpt_every,
                     config.segment_replay)
  n_seg, n_ck = pl.cdiv(T, S), pl.cdiv(T, K)
  sp = dict(full=pl.BlockSpec((B, T, BC), lambda j, k: (0, 0, j)),
            row=pl.BlockSpec((B, BC), lambda j, k: (0, j)),
            seg=pl.BlockSpec((B, n_seg, BC), lambda j, k: (0, 0, j)),
            ck=pl.BlockSpec((B, n_ck, BC), lambda j, k: (0, 0, j)))
  seg_shape = jax.ShapeDtypeStruct((B, n_seg, C), jnp.float32)
  # the checkpoints are an output in inference too (written there only for fixup_merge)
  call = functools.partial(
      pl.pallas_call, grid=(pl.cdiv(C, BC), B * n_seg),
      out_shape=(jax.ShapeDtypeStruct((B, T, C), x.dtype), seg_shape, seg_shape,
                 jax.ShapeDtypeStruct((B, n_ck, C), jnp.float32)),
      out_specs=(sp["full"], sp["seg"], sp["seg"], sp["ck"]),
      interpret=interpret, compiler_params=compiler_params)
  kernel = functools.partial(_kernel, B=B, T=T, C=C, BC=BC, S=S, TT=TT, K=K, W=W,
                             n_seg=n_seg, merge=config.fixup_merge, **kw)
  return call, kernel, sp


def first_pass(x, v0, p, save_ckpt, interpret, config, compiler_params):
  """Every segment from its replayed start: (spikes, end, used [B, n_seg, C], checkpoints)."""
  call, kernel, sp = _call(x, config, compiler_params, interpret, p=p, replay=True,
                           save_ckpt=save_ckpt)
  return call(kernel, in_specs=[sp["full"], sp["row"]], name="lif_fwd_segments")(x, v0)


def fix_up_pass(x, v0, state, p, save_ckpt, interpret, config, compiler_params):
  """One fix-up pass over first_pass's state (spikes, end, used, checkpoints): the segments
  whose start disagrees walk again, to the segment's end or (config.fixup_merge) until it
  meets its earlier walk (spikes and checkpoints rewritten in place)."""
  s, end, used, ckpt = state
  call, kernel, sp = _call(x, config, compiler_params, interpret, p=p, replay=False,
                           save_ckpt=save_ckpt)
  return call(kernel, in_specs=[sp["full"], sp["row"], sp["seg"], sp["seg"], sp["full"],
                                sp["ck"]],
              input_output_aliases={4: 0, 5: 3},
              name="lif_fwd_segments_fixup")(x, v0, end, used, s, ckpt)


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
