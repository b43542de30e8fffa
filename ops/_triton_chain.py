"""Chained scan across programs for Pallas Triton recurrences (LIF backward, ...).

A recurrence over time run by one program per channel block is latency-bound when batch x
channels is small (B=1, 8192 channels is 256 single-warp programs: two warps per SM, each
walking 8192 dependent steps). When the recurrence is affine in its carry, time can be cut
into segments run by separate programs: each program first does the segment-local work
(loads, recomputation, the segment's affine map carry_out = M * carry_in + N) in parallel
with all others, then waits for the carry of the neighbouring segment, publishes its own and
finishes. Only the short wait -> publish hop is serial.

Progress: programs take tickets from a per-channel-block atomic counter, and the segment a
program works on is a function of its ticket, in chain order. The program it waits for took an
earlier ticket, so it is running or done, whatever order the hardware starts programs in.

Hand-off: one int32 word per (segment, channel) in a buffer pre-filled with SENTINEL, written
with an atomic exchange and read with atomic ORs of 0 until no lane holds SENTINEL. The value
and its "ready" flag are the same word, so no fence between a value store and a flag store is
needed. SENTINEL is a signalling-NaN bit pattern; GPU arithmetic only produces the canonical
quiet NaN, and `publish` canonicalises NaNs, so no real value collides with it.

In interpret mode (CPU) programs run one after another in grid order, which is ticket order,
so every wait finds its value already published: there reads and writes are masked loads and
stores (the interpreter has no masked or exchanging atomics). The atomic path is checked by
lowering for CUDA on the CPU host and run by the GPU tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plgpu

SENTINEL = np.int32(0x7F80DEAD)


def take_ticket(counter_ref, index):
  """The next ticket (0, 1, ...) of counter_ref[index] (int32), atomically."""
  return plgpu.atomic_add(counter_ref, (index,), jnp.int32(1))


def publish(buf_ref, idx, value, mask, interpret):
  """Makes value (f32 vector) the carry at buf_ref[idx] for the lanes in mask."""
  value = jnp.where(value == value, value, jnp.float32(jnp.nan)).astype(jnp.float32)
  bits = lax.bitcast_convert_type(value, jnp.int32)
  if interpret:
    plgpu.store(buf_ref.at[idx], bits, mask=mask)
  else:
    plgpu.atomic_xchg(buf_ref, idx, bits, mask=mask)


def wait(buf_ref, idx, mask, interpret):
  """The f32 carry at buf_ref[idx] once every lane in mask has been published."""
  bits = _read(buf_ref, idx, mask, interpret)
  if not interpret:     # interpret mode runs programs in ticket order: already published
    bits = lax.while_loop(lambda bits: jnp.logical_not(_all_published(bits, mask)),
                          lambda _: _read(buf_ref, idx, mask, False), bits)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _read(ref, idx, mask, interpret):
  if interpret:
    return plgpu.load(ref.at[idx], mask=mask, other=0)
  # an atomic OR of 0 reads without writing. Not an add of 0: Pallas lowers an add of an
  # int32 vector as a float add, which turns the SENTINEL (a NaN pattern) into a NaN.
  return plgpu.atomic_or(ref, idx, jnp.zeros(mask.shape, jnp.int32), mask=mask)


def _all_published(bits, mask):
  return jnp.max(jnp.where(mask & (bits == SENTINEL), 1, 0)) == 0


def in_slot(q, forward):
  """Carry slot segment q reads (slots 0..n_seg; a forward chain runs q = 0, 1, ...)."""
  return q if forward else q + 1


def out_slot(q, forward):
  """Carry slot segment q publishes: the in slot of the segment after it in chain order."""
  return q + 1 if forward else q


def receive(buf_ref, agg_ref, b, q, m, n, mask, interpret, *, forward, n_seg):
  """The carry entering segment q of batch row b, whose own map is out = m * in + n.

  agg_ref None: waits for the previous segment's published carry (one serial hop per
  segment). Otherwise decoupled look-back: publishes (m, n) to agg_ref[b, q, 0 / 1] at once,
  then walks back over earlier segments, folding in each one's map until one whose carry is
  published, so a segment need not wait for its neighbour to finish its own wait. The caller
  publishes m * carry + n to buf_ref[b, out_slot(q)] either way.
  """
  if agg_ref is None:
    return wait(buf_ref, (b, in_slot(q, forward), slice(None)), mask, interpret)
  # (traced indices: the interpreter's masked loads and stores take no Python ints)
  first, second = jnp.int32(0), jnp.int32(1)
  publish(agg_ref, (b, q, first, slice(None)), m, mask, interpret)
  publish(agg_ref, (b, q, second, slice(None)), n, mask, interpret)
  step = -1 if forward else 1
  f32 = lambda bits: lax.bitcast_convert_type(bits, jnp.float32)

  def body(state):
    p, acc_m, acc_n, _, carry = state
    inc = _read(buf_ref, (b, out_slot(p, forward), slice(None)), mask, interpret)
    pc = jnp.clip(p, 0, n_seg - 1)      # p outside the chain: its carry is the chain's input
    agg_m = _read(agg_ref, (b, pc, first, slice(None)), mask, interpret)
    agg_n = _read(agg_ref, (b, pc, second, slice(None)), mask, interpret)
    done = _all_published(inc, mask)
    fold = jnp.logical_not(done) & _all_published(agg_m, mask) & _all_published(agg_n, mask)
    carry = jnp.where(done, acc_m * f32(inc) + acc_n, carry)
    acc_n = jnp.where(fold, acc_m * f32(agg_n) + acc_n, acc_n)
    acc_m = jnp.where(fold, acc_m * f32(agg_m), acc_m)
    return jnp.where(fold, p + step, p), acc_m, acc_n, done, carry

  ones = jnp.ones(mask.shape, jnp.float32)
  zeros = jnp.zeros(mask.shape, jnp.float32)
  state = (q + step, ones, zeros, jnp.bool_(False), zeros)
  return lax.while_loop(lambda s: jnp.logical_not(s[3]), body, state)[4]


def operands(B, C, BC, n_seg, first, forward, lookback):
  """Chain state for a pallas_call with grid (cdiv(C, BC), B * n_seg): arrays, BlockSpecs
  (the same for in and out: each array is aliased to an output and updated in place) and
  output shapes of the ticket counter, the carry slots [B, n_seg + 1, C] with `first`
  ([B, C]) published at the chain's input slot, and with lookback the segments' maps
  [B, n_seg, 2, C]."""
  from jax.experimental import pallas as pl
  n_cb = pl.cdiv(C, BC)
  first_slot = 0 if forward else n_seg
  arrays = [jnp.zeros((n_cb,), jnp.int32),
            carry_buffer((B, n_seg + 1, C), first=first, at=(slice(None), first_slot))]
  specs = [pl.BlockSpec((n_cb,), lambda j, k: (0,)),
           pl.BlockSpec((B, n_seg + 1, BC), lambda j, k: (0, 0, j))]
  if lookback:
    arrays.append(jnp.full((B, n_seg, 2, C), SENTINEL, jnp.int32))
    specs.append(pl.BlockSpec((B, n_seg, 2, BC), lambda j, k: (0, 0, 0, j)))
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
  return arrays, specs, shapes


def carry_buffer(shape, first=None, at=None):
  """A SENTINEL-filled int32 hand-off buffer; optionally with f32 `first` already published
  at buf[at] (the carry entering the chain)."""
  buf = jnp.full(shape, SENTINEL, jnp.int32)
  if first is not None:
    buf = buf.at[at].set(lax.bitcast_convert_type(first.astype(jnp.float32), jnp.int32))
  return buf


def as_float(buf):
  """The f32 values of a hand-off buffer (after the kernel published into it)."""
  return lax.bitcast_convert_type(buf, jnp.float32)
