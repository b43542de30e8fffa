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
so every wait finds its value already published: there `publish` and `wait` are a masked store
and load (the interpreter has no masked or exchanging atomics). The atomic path is checked by
lowering for CUDA on the CPU host and run by the GPU tests.
"""
from __future__ import annotations

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
  if interpret:
    return lax.bitcast_convert_type(plgpu.load(buf_ref.at[idx], mask=mask, other=0),
                                    jnp.float32)
  zero = jnp.zeros(mask.shape, jnp.int32)

  def read(_):
    # an atomic OR of 0 reads without writing. Not an add of 0: Pallas lowers an add of an
    # int32 vector as a float add, which turns the SENTINEL (a NaN pattern) into a NaN.
    return plgpu.atomic_or(buf_ref, idx, zero, mask=mask)

  def pending(bits):
    return jnp.max(jnp.where(mask & (bits == SENTINEL), 1, 0)) > 0

  bits = lax.while_loop(pending, read, read(None))
  return lax.bitcast_convert_type(bits, jnp.float32)


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
