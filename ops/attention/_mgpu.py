"""Pieces shared by the Mosaic GPU attention kernels (forward and backward)."""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops._mosaic_gpu import interpret_params

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
COMPUTE_WGS = 2           # compute warpgroups per CTA (plus one memory warpgroup)
SMEM_LIMIT = 232448       # bytes of shared memory one CTA may take on Hopper (jax 0.11.2)


def smem_transforms(cols: int, dtype) -> tuple:
  """Tiling + swizzle of a shared-memory tile whose rows hold `cols` elements of dtype."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(cols * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def kernel_call(body, out_type, grid, grid_names, interpret: bool):
  """plgpu.kernel of COMPUTE_WGS compute warpgroups plus one memory warpgroup ("wg")."""
  return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=grid_names,
                      num_threads=COMPUTE_WGS + 1, thread_name="wg",
                      interpret=interpret_params() if interpret else False,
                      compiler_params=plgpu.CompilerParams(approx_math=True))


def ring_loader(n_steps, stages, frees, load) -> None:
  """The memory warpgroup: load(j, slot, ready) for steps 0..n_steps-1 into a ring of `stages`
  slots. load calls ready(free) before it overwrites the arrays a barrier array of `frees`
  guards (both compute warpgroups arrive on them): a wait on refills, nothing on the first
  fill, so a kernel can start one array's load before the next array's slot is released.
  Then waits for the last slots' release."""
  no_wait = lambda free: None
  for i in range(stages):
    pl.when(i < n_steps)(functools.partial(load, i, i, no_wait))

  @pl.loop(stages, jnp.maximum(n_steps, stages))
  def _refill(j):
    slot = lax.rem(j, stages)
    load(j, slot, lambda free: plgpu.barrier_wait(free.at[slot]))

  @pl.loop(jnp.maximum(n_steps, stages), n_steps + stages)
  def _drain(j):
    for free in frees:
      plgpu.barrier_wait(free.at[lax.rem(j, stages)])


def key_steps(row0, *, bq, bk, causal, q_offset, kv_len):
  """Key steps of the query rows [row0, row0 + bq) -> (unmasked steps, all steps): steps
  below the first count need no mask; the rest mask the diagonal and keys >= kv_len."""
  if not causal:
    return kv_len // bk, (kv_len + bk - 1) // bk
  last = jnp.minimum(row0 + (bq - 1 + q_offset), kv_len - 1)     # last key any row sees
  return jnp.minimum(lax.div(row0 + (q_offset + 1), bk), kv_len // bk), lax.div(last, bk) + 1


def pass_slot(slot, rings) -> None:
  """A ring step this compute warpgroup has no work in: for each (loaded, free) barrier array,
  wait for the slot's load, then release it. The other warpgroup needs the load anyway, and
  waiting keeps a release from counting toward an earlier phase of the slot (and every phase
  observed by every thread that waits on the barrier, which interpret mode checks)."""
  for loaded, free in rings:
    plgpu.barrier_wait(loaded.at[slot])
    plgpu.barrier_arrive(free.at[slot])


def register_ops(interpret: bool):
  """(layout_cast, iota(shape, dim), load_vector(smem, layout)) for the WGMMA register layout;
  interpret mode has no rules for register layouts (jax 0.10-0.11), so there they are plain."""
  wgmma = plgpu.Layout.WGMMA
  if interpret:
    return ((lambda x, _: x), (lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim)),
            (lambda ref, _: ref[...]))
  return (plgpu.layout_cast,
          lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=wgmma),
          lambda ref, layout: plgpu.load(ref, (), layout=layout))


def product(a, b, shape, *, a_in_smem: bool, b_transposed=False, acc=None, during=None,
            interpret: bool):
  """acc + a @ b (b^T when b_transposed) in f32 [shape], by wgmma: a is a shared-memory tile
  (a_in_smem) or a register array (WGMMA layout, 16-bit), b a shared-memory tile. Interpret
  mode has neither transposed shared-memory operands nor register operands nor pl.run_state
  (jax 0.10-0.11): there it is a plain dot of the same values. `during()` runs while the
  tensor cores work."""
  during = during or (lambda: None)
  if interpret:
    during()
    av = a[...] if a_in_smem else a
    bv = b[...]
    bv = bv.T if b_transposed else bv
    out = lax.dot(av, bv, preferred_element_type=jnp.float32)
    return out if acc is None else acc + out
  b_op = plgpu.transpose_ref(b, (1, 0)) if b_transposed else b
  if acc is None:
    def fresh(acc_ref):
      plgpu.wgmma(acc_ref, a, b_op)
      during()
      return acc_ref[...]
    return pl.run_scoped(fresh, plgpu.ACC(shape, jnp.float32))

  def onto(acc_ref):
    plgpu.wgmma(acc_ref, a, b_op)
    during()
  return pl.run_state(onto)(plgpu.ACC.init(acc))
