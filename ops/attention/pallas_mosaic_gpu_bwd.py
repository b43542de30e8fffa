"""Flash attention backward in Pallas Mosaic GPU: a dq kernel and a dk/dv kernel.

Both take the forward's lse (as lse2 = lse * log2 e) and delta = rowsum(dO * O) - dlse, and
recompute P = exp2(S * scale * log2 e - lse2) tile by tile. Each CTA has two compute
warpgroups and one memory warpgroup that streams tiles by TMA into a ring of `stages` slots
(a "loaded" barrier per slot, a "free" one both compute warpgroups arrive on):

- dq: a warpgroup owns `block` query rows of one head (Q, dO, lse2, delta loaded once) and
  walks the key tiles the forward walks: S = Q K^T, dP = dO V^T, dS = P (dP - delta),
  dQ += dS K (dS as a register operand).
- dk/dv: a warpgroup owns `block` keys of one kv head (K, V loaded once) and walks the query
  tiles of every query head of its GQA group: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
  dS^T = P^T (dP^T - delta), dK += dS^T Q. The group is summed in registers, so dk/dv come
  out per kv head.

Under a causal mask a warpgroup with fewer tiles than the CTA's other one still waits for the
loads of the tiles it skips and releases them, so the ring stays in step (and every thread
observes every phase of the barriers it waits on, which interpret mode checks).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops.attention._mgpu import (COMPUTE_WGS, LOG2E, kernel_call, key_steps, pass_slot, product,
                                 register_ops, ring_loader, smem_transforms)


def dq(q, k, v, do, lse2, delta, *, causal, scale, q_offset, kv_len, block, stages, interpret):
  """q, do [b, lq, h, d] (lq % (2 block) == 0); k, v [b, lk, hk, d] (lk % block == 0; keys
  >= kv_len masked); lse2, delta [b, h, lq] f32 -> dq [b, lq, h, d]."""
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  bq = bk = block
  n_tiles = lq // (COMPUTE_WGS * bq)
  dtype = q.dtype
  c = scale * LOG2E
  steps = functools.partial(key_steps, bq=bq, bk=bk, causal=causal, q_offset=q_offset,
                            kv_len=kv_len)
  layout, iota, load_vec = register_ops(interpret)
  wgmma, rows_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)
  mm = functools.partial(product, interpret=interpret)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, bufs, loaded, freed):
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = bufs
    own_loaded, k_loaded, v_loaded = loaded
    k_free, v_free = freed
    bi, hi, tile = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    cta_row0 = tile * (COMPUTE_WGS * bq)
    _, cta_steps = steps(cta_row0 + (COMPUTE_WGS - 1) * bq)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      row0 = cta_row0 + wg * bq
      full, total = steps(row0)
      rows = (bi, pl.ds(row0, bq), hi)
      vec = (bi, hi, pl.ds(row0, bq))
      bar = own_loaded.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[wg], bar)
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[wg], bar)
      plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[wg], bar)
      plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[wg], bar)
      plgpu.barrier_wait(bar)
      lse = load_vec(lse_smem.at[wg], rows_layout)
      dlt = load_vec(delta_smem.at[wg], rows_layout)
      acc = layout(jnp.zeros((bq, d), jnp.float32), wgmma)
      plgpu.barrier_wait(k_loaded.at[0])

      def step(j, acc, masked):
        slot = lax.rem(j, stages)
        s = mm(q_smem.at[wg], k_smem.at[slot], (bq, bk), a_in_smem=True, b_transposed=True)
        if masked:
          cols = iota((bq, bk), 1) + j * bk
          ok = cols < kv_len
          if causal:
            ok = ok & (cols <= iota((bq, bk), 0) + (row0 + q_offset))
          s = jnp.where(ok, s, -jnp.inf)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
        plgpu.barrier_wait(v_loaded.at[slot])
        dp = mm(do_smem.at[wg], v_smem.at[slot], (bq, bk), a_in_smem=True, b_transposed=True)
        plgpu.barrier_arrive(v_free.at[slot])
        ds = (p * (dp - lax.broadcast_in_dim(dlt, s.shape, [0]))).astype(dtype)
        acc = mm(ds, k_smem.at[slot], (bq, d), a_in_smem=False, acc=acc)
        plgpu.barrier_arrive(k_free.at[slot])

        @pl.when(j + 1 < total)
        def _():
          plgpu.barrier_wait(k_loaded.at[lax.rem(j + 1, stages)])
        return acc

      acc = lax.fori_loop(0, full, functools.partial(step, masked=False), acc)
      acc = lax.fori_loop(full, total, functools.partial(step, masked=True), acc)

      @pl.loop(total, cta_steps)
      def _skipped(j):
        pass_slot(lax.rem(j, stages), ((k_loaded, k_free), (v_loaded, v_free)))

      q_smem.at[wg][...] = (acc * scale).astype(dtype)     # Q's last reader is done
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(hi, group)

      def load(j, slot, ready):
        ready(k_free)
        ready(v_free)
        keys = (bi, pl.ds(j * bk, bk), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

      ring_loader(cta_steps, stages, (k_free, v_free), load)

  def entry(*refs):
    tr = smem_transforms(d, dtype)
    pl.run_scoped(
        lambda bufs, loaded, freed: kernel(*refs, bufs, loaded, freed),
        (plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
         plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
         plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
         plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
         plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bk, d), dtype, transforms=tr)),
        (plgpu.Barrier(num_arrivals=4, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        collective_axes="wg",
    )

  return kernel_call(entry, jax.ShapeDtypeStruct(q.shape, dtype), (h, n_tiles, b),
                     ("heads", "q_tiles", "batch"), interpret)(q, k, v, do, lse2, delta)


def _tile_range(k0, *, bq, bk, causal, q_offset, kv_len, n_q):
  """Query tiles the keys [k0, k0 + bk) need -> (first tile, first tile without a mask):
  tiles before the second need the causal / key-validity mask."""
  if not causal:
    return jnp.int32(0), jnp.where(k0 + bk > kv_len, n_q, 0)
  first = jnp.minimum(lax.div(jnp.maximum(k0 - q_offset, 0), bq), n_q)
  # a tile needs no mask once its first query sees the tile's last key
  clean = lax.div(jnp.maximum(k0 + (bk - 1 - q_offset), 0) + (bq - 1), bq)
  clean = jnp.where(k0 + bk > kv_len, n_q, jnp.clip(clean, first, n_q))
  return first, clean


def dkv(q, k, v, do, lse2, delta, *, causal, scale, q_offset, kv_len, block, stages,
        interpret):
  """Shapes as in `dq` (lk % (2 block) == 0, lq % block == 0) -> dk, dv [b, lk, hk, d]."""
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  group = h // hk
  bq = bk = block
  n_q = lq // bq
  n_tiles = lk // (COMPUTE_WGS * bk)
  dtype = q.dtype
  c = scale * LOG2E
  tiles = functools.partial(_tile_range, bq=bq, bk=bk, causal=causal, q_offset=q_offset,
                            kv_len=kv_len, n_q=n_q)
  layout, iota, load_vec = register_ops(interpret)
  wgmma, cols_layout = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(0)
  mm = functools.partial(product, interpret=interpret)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, bufs, loaded,
             free):
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = bufs
    own_loaded, step_loaded = loaded
    bi, kvh, tile = lax.axis_index("batch"), lax.axis_index("kv_heads"), lax.axis_index("k_tiles")
    wg = lax.axis_index("wg")
    cta_k0 = tile * (COMPUTE_WGS * bk)
    cta_first, _ = tiles(cta_k0)               # the first keys are seen by the most queries
    per_head = n_q - cta_first
    n_steps = group * per_head

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      k0 = cta_k0 + wg * bk
      first, clean = tiles(k0)
      keys = (bi, pl.ds(k0, bk), kvh)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], own_loaded.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], own_loaded.at[wg])
      plgpu.barrier_wait(own_loaded.at[wg])
      zeros = layout(jnp.zeros((bk, d), jnp.float32), wgmma)

      def step(t, carry, head, masked):
        dk, dv = carry
        slot = lax.rem(head * per_head + (t - cta_first), stages)
        plgpu.barrier_wait(step_loaded.at[slot])
        s_t = mm(k_smem.at[wg], q_smem.at[slot], (bk, bq), a_in_smem=True, b_transposed=True)
        if masked:
          key = iota((bk, bq), 0) + k0
          ok = key < kv_len
          if causal:
            ok = ok & (key <= iota((bk, bq), 1) + (t * bq + q_offset))
          s_t = jnp.where(ok, s_t, -jnp.inf)
        lse = load_vec(lse_smem.at[slot], cols_layout)
        p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, s_t.shape, [1]))
        dv = mm(p_t.astype(dtype), do_smem.at[slot], (bk, d), a_in_smem=False, acc=dv)
        dp_t = mm(v_smem.at[wg], do_smem.at[slot], (bk, bq), a_in_smem=True, b_transposed=True)
        dlt = load_vec(delta_smem.at[slot], cols_layout)
        ds_t = (p_t * (dp_t - lax.broadcast_in_dim(dlt, s_t.shape, [1]))).astype(dtype)
        dk = mm(ds_t, q_smem.at[slot], (bk, d), a_in_smem=False, acc=dk)
        plgpu.barrier_arrive(free.at[slot])
        return dk, dv

      def head_tiles(head, carry):
        @pl.loop(cta_first, first)          # tiles only the other warpgroup needs
        def _skipped(t):
          pass_slot(lax.rem(head * per_head + (t - cta_first), stages), ((step_loaded, free),))

        carry = lax.fori_loop(first, clean, functools.partial(step, head=head, masked=True),
                              carry)
        return lax.fori_loop(clean, n_q, functools.partial(step, head=head, masked=False),
                             carry)

      dk, dv = lax.fori_loop(0, group, head_tiles, (zeros, zeros))
      k_smem.at[wg][...] = (dk * scale).astype(dtype)       # K's and V's last readers are done
      v_smem.at[wg][...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[keys])
      plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[keys])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def load(j, slot, ready):
        ready(free)
        head = kvh * group + lax.div(j, jnp.maximum(per_head, 1))
        t = cta_first + lax.rem(j, jnp.maximum(per_head, 1))
        rows, vec = (bi, pl.ds(t * bq, bq), head), (bi, head, pl.ds(t * bq, bq))
        bar = step_loaded.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(lse_ref.at[vec], lse_smem.at[slot], bar)
        plgpu.copy_gmem_to_smem(delta_ref.at[vec], delta_smem.at[slot], bar)

      ring_loader(n_steps, stages, (free,), load)

  def entry(*refs):
    tr = smem_transforms(d, dtype)
    pl.run_scoped(
        lambda bufs, loaded, free: kernel(*refs, bufs, loaded, free),
        (plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=tr),
         plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bq), jnp.float32),
         plgpu.SMEM((stages, bq), jnp.float32)),
        (plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),
         plgpu.Barrier(num_arrivals=4, num_barriers=stages)),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        collective_axes="wg",
    )

  out = jax.ShapeDtypeStruct(k.shape, dtype)
  return kernel_call(entry, (out, out), (hk, n_tiles, b), ("kv_heads", "k_tiles", "batch"),
                     interpret)(q, k, v, do, lse2, delta)
