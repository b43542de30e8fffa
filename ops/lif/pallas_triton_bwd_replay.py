"""LIF backward as time segments started from replayed carries (Pallas Triton, GPU):
config.bwd_replay > 0, for hard reset with detach_reset (segments of bwd_replay_segment steps,
bwd_replay_block_c channels per program).

The chained segment backward (pallas_triton_segments.py) hands the membrane gradient from each
segment to the one before it; on the H200 that hand-off, not the traffic, limits it (B1 T8192
C8192 f32 fwd+bwd 0.90-0.97 ms, 40-44% of copy, whatever the channel-block width, session 16).
Here no segment waits for another. Going backwards, dL/dv_{t-1} = beta * du_t with
du_t = A_t * dL/dv_t + G_t * ds_t, and with a hard reset whose spike is detached A_t is exactly
0 wherever the step spikes or clamps: the carry is forgotten there, and from that step down a
walk started from any carry computes bit-identical values. So:
  pass    one program per (batch row, S-step segment, channel block) replays the first W steps
          of the segment after it from a zero carry (from gv when that window reaches the end
          of time) to get the carry entering its own last step, then walks its own steps
          backwards from it, writing dx, its outgoing carry and the carry it started from.
          Each K-step chunk recomputes u from the forward's checkpoint, as the serial kernel;
          with bwd_replay_prefetch the next chunk's rows are loaded before this one is walked
          (1.5x faster on the H200: without it each chunk waited for its own loads).
  check   every segment's starting carry equals the outgoing carry of the segment after it,
          channel by channel: then, by induction from the last segment (started from gv),
          every carry is the true one.
  fix-up  otherwise a while loop re-runs the segments whose carry disagrees from the right one
          (ops/lif/pallas_triton_fwd_segments.until_consistent), at most n_seg - 1 passes.
          With config.fixup_merge each walk stores the carry leaving every chunk, and a
          re-run stops at the first chunk whose carry equals the stored one (the two walks have merged, so everything below
          is already right), so a wrong start costs the steps until the carries merge, not
          the whole segment.
With a subtract reset or detach_reset=False, A_t is rarely 0 and nearly every segment would be
re-run n_seg times, so those use the chained kernel. Traffic: x and ds read 1 + W / S times,
dx written once, the chunk carries (fixup_merge: 1 / ckpt_every of a row per step) written
once, plus what fix-ups re-run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops.lif.pallas_triton_fwd_segments import agree, differs, until_consistent
from ops.lif.steps import step_backward, step_forward


def applies(p) -> bool:
  """Whether the carry is forgotten at spikes (hard reset, detached), as the replay needs."""
  return p["reset"] == "hard" and p["detach_reset"]


def _walk_back(x_ref, ckpt_ref, ds_ref, b, dv, lo, n_chunks, cmask, *, T, K, p, prefetch,
               dx_ref=None, carry_ref=None, check=False):
  """Walks steps lo + n_chunks * K - 1 down to lo (rows >= T are no-ops) from carry dv, one
  K-step chunk at a time: reload the chunk's checkpoint, recompute u, step back. Writes dx
  when dx_ref is given. prefetch: chunk c + 1's rows are loaded before chunk c is computed
  (their latency hidden by its work, at twice the rows held in registers); else each chunk
  loads its own rows and waits for them.

  carry_ref [B, ceil(T / K), C]: row i holds the carry leaving chunk i (into step i * K - 1).
  check=False writes it. check=True (a fix-up walk) compares each new carry with the stored
  one first and stops at the first chunk where they agree on every channel: from there down
  the walk would rewrite exactly what an earlier walk wrote (the carry is all the state).
  Returns (the carry leaving step lo, whether the walk stopped early; then that carry is the
  stored one's, not recomputed)."""

  def row(ref, t, ok):
    return plgpu.load(ref.at[b, jnp.clip(t, 0, T - 1), :], mask=cmask & ok & (t < T),
                      other=0).astype(jnp.float32)

  def top(c):            # first step of chunk c (chunks run last first)
    return lo + (n_chunks - 1 - c) * K

  def load(c):
    ok = c < n_chunks
    t0 = top(c)
    v = plgpu.load(ckpt_ref.at[b, jnp.clip(t0 // K, 0, ckpt_ref.shape[1] - 1), :],
                   mask=cmask & ok, other=0)
    return (v, tuple(row(x_ref, t0 + i, ok) for i in range(K)),
            tuple(row(ds_ref, t0 + i, ok) for i in range(K)))

  def chunk(c, dv, rows):
    t0 = top(c)
    v, xs, dss = rows
    us = []
    for i in range(K):
      u, v, _ = step_forward(v, xs[i], p)
      us.append(u)
    for i in reversed(range(K)):
      t = t0 + i
      valid = t < T
      du = step_backward(us[i], dss[i], dv, p)
      if dx_ref is not None:
        plgpu.store(dx_ref.at[b, jnp.clip(t, 0, T - 1), :], du.astype(dx_ref.dtype),
                    mask=cmask & valid)
      dv = jnp.where(valid, p["beta"] * du, dv)
    return dv

  def record(c, dv):     # -> whether the stored carry already equals dv (check only)
    never = c < 0        # a traced False: the Triton lowering yields no literal constants
    if carry_ref is None:
      return never
    real = top(c) < T    # the last segment's chunks past the end of time are no-ops
    at = carry_ref.at[b, jnp.clip(top(c) // K, 0, carry_ref.shape[1] - 1), :]
    same = never
    if check:
      old = plgpu.load(at, mask=cmask, other=0)
      same = real & agree(dv, old, cmask)
    plgpu.store(at, dv, mask=cmask & real)
    return same

  c0 = jnp.int32(0)
  if carry_ref is None:  # a fixed trip count (the loop the GPU runs have timed)
    if not prefetch:
      return lax.fori_loop(0, n_chunks, lambda c, dv: chunk(c, dv, load(c)), dv), c0 < 0
    dv, _ = lax.fori_loop(0, n_chunks, lambda c, st: (chunk(c, st[0], st[1]), load(c + 1)),
                          (dv, load(c0)))
    return dv, c0 < 0

  def cond(state):
    return (state[0] < n_chunks) & ~state[2]

  def body(state):
    c, dv, _, *held = state
    nxt = (load(c + 1),) if prefetch else ()
    dv = chunk(c, dv, held[0] if prefetch else load(c))
    return (c + 1, dv, record(c, dv)) + nxt

  init = (c0, dv, c0 < 0) + ((load(c0),) if prefetch else ())
  _, dv, stopped, *_ = lax.while_loop(cond, body, init)
  return dv, stopped


def _kernel(x_ref, ckpt_ref, ds_ref, gv_ref, *refs, T, C, BC, S, K, W, n_seg, p, replay,
            prefetch, merge):
  """replay=True: the first pass. replay=False: a fix-up pass; extra inputs out_prev,
  used_prev [B, n_seg, BC], dx and the chunk carries, the last two updated in place.
  merge=False: the chunk carries are neither written nor read (fix-ups walk whole segments)."""
  if replay:
    dx_ref, out_ref, used_ref, carry_ref = refs
  else:
    out_prev_ref, used_prev_ref, _, _, dx_ref, out_ref, used_ref, carry_ref = refs
  carry_ref = carry_ref if merge else None
  j = pl.program_id(0)
  b = pl.program_id(1) // n_seg
  q = pl.program_id(1) % n_seg
  cmask = (j * BC + lax.broadcasted_iota(jnp.int32, (BC,), 0)) < C
  gv = plgpu.load(gv_ref.at[b, :], mask=cmask, other=0)
  walk = functools.partial(_walk_back, x_ref, ckpt_ref, ds_ref, b, T=T, K=K, p=p,
                           prefetch=prefetch)
  own = lambda dv, check: walk(dv, q * S, S // K, cmask, dx_ref=dx_ref, carry_ref=carry_ref,
                               check=check)
  store = lambda ref, val: plgpu.store(ref.at[b, q, :], val, mask=cmask)
  last = q == n_seg - 1

  if replay:
    top = (q + 1) * S
    # a window that reaches the end of time starts from the true carry, gv
    dv = jnp.where(top + W >= T, gv, jnp.zeros((BC,), jnp.float32))
    guess = walk(dv, top, W // K, cmask & ~last)[0] if W else dv
    start = jnp.where(last, gv, guess)
    store(used_ref, start)
    store(out_ref, own(start, False)[0])
    return

  nxt = plgpu.load(out_prev_ref.at[b, jnp.minimum(q + 1, n_seg - 1), :], mask=cmask, other=0)
  start = jnp.where(last, gv, nxt)
  used = plgpu.load(used_prev_ref.at[b, q, :], mask=cmask, other=0)
  redo = ~agree(start, used, cmask)
  store(used_ref, start)
  out_prev = plgpu.load(out_prev_ref.at[b, q, :], mask=cmask, other=0)

  @pl.when(redo)
  def _():
    dv, stopped = own(start, True)
    store(out_ref, jnp.where(stopped, out_prev, dv))

  @pl.when(~redo)
  def _():
    store(out_ref, out_prev)


def consistent(out, used):
  """Whether every segment started from the carry the segment after it hands over.
  out, used: [batch, n_seg, channels] f32."""
  return ~jnp.any(differs(used[:, :-1], out[:, 1:]))


def run(x, ckpt, ds, gv, p, interpret, config, compiler_params, max_fixups=None):
  """((dx [B, T, C] in x.dtype, dv0 [B, C] f32), fix-up passes run). x, ds: [B, T, C];
  ckpt: [B, ceil(T / ckpt_every), C] f32 (v before every ckpt_every-th step); gv: [B, C]."""
  state = first_pass(x, ckpt, ds, gv, p, interpret, config, compiler_params)
  (dx, out, *_), n = until_consistent(
      lambda *st: fix_up_pass(x, ckpt, ds, gv, st, p, interpret, config, compiler_params),
      state, lambda dx, out, used, carries: consistent(out, used), pl.cdiv(x.shape[1],
      config.bwd_replay_segment), max_fixups)
  return (dx, out[:, 0]), n


def _call(x, config, compiler_params, interpret, **kw):
  B, T, C = x.shape
  BC, S = config.bwd_replay_block_c, config.bwd_replay_segment
  K, W = config.ckpt_every, config.bwd_replay
  n_seg, n_ck = pl.cdiv(T, S), pl.cdiv(T, K)
  specs = dict(full=pl.BlockSpec((B, T, BC), lambda j, k: (0, 0, j)),
               ck=pl.BlockSpec((B, n_ck, BC), lambda j, k: (0, 0, j)),
               row=pl.BlockSpec((B, BC), lambda j, k: (0, j)),
               seg=pl.BlockSpec((B, n_seg, BC), lambda j, k: (0, 0, j)))
  seg_shape = jax.ShapeDtypeStruct((B, n_seg, C), jnp.float32)
  call = functools.partial(
      pl.pallas_call, grid=(pl.cdiv(C, BC), B * n_seg),
      out_specs=(specs["full"], specs["seg"], specs["seg"], specs["ck"]),
      out_shape=(jax.ShapeDtypeStruct((B, T, C), x.dtype), seg_shape, seg_shape,
                 jax.ShapeDtypeStruct((B, n_ck, C), jnp.float32)),
      interpret=interpret, compiler_params=compiler_params)
  kernel = functools.partial(_kernel, T=T, C=C, BC=BC, S=S, K=K, W=W, n_seg=n_seg,
                             prefetch=config.bwd_replay_prefetch, merge=config.fixup_merge,
                             **kw)
  return call, kernel, specs


def first_pass(x, ckpt, ds, gv, p, interpret, config, compiler_params):
  """Every segment from its replayed carry: (dx, out, used [B, n_seg, C], chunk carries
  [B, ceil(T / ckpt_every), C])."""
  call, kernel, sp = _call(x, config, compiler_params, interpret, p=p, replay=True)
  return call(kernel, in_specs=[sp["full"], sp["ck"], sp["full"], sp["row"]],
              name="lif_bwd_replay")(x, ckpt, ds, gv)


def fix_up_pass(x, ckpt, ds, gv, state, p, interpret, config, compiler_params):
  """One fix-up pass over first_pass's state (dx, out, used, carries): the segments whose
  carry disagrees walk again, to the segment's start or (config.fixup_merge) until they meet
  their earlier walk (dx and the carries rewritten in place)."""
  dx, out, used, carries = state
  call, kernel, sp = _call(x, config, compiler_params, interpret, p=p, replay=False)
  return call(kernel, in_specs=[sp["full"], sp["ck"], sp["full"], sp["row"], sp["seg"],
                                sp["seg"], sp["full"], sp["ck"]],
              input_output_aliases={6: 0, 7: 3},
              name="lif_bwd_replay_fixup")(x, ckpt, ds, gv, out, used, dx, carries)


def backward(x, ckpt, ds, gv, p, interpret, config, compiler_params):
  return run(x, ckpt, ds, gv, p, interpret, config, compiler_params)[0]
