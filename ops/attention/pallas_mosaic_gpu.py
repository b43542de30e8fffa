"""Flash attention forward in Pallas Mosaic GPU (Hopper: TMA, wgmma, warp specialisation).

A CTA serves one (query head, 2 x block_q query rows, batch) with three warpgroups:

- two compute warpgroups own block_q query rows each. Per key step: S = Q K^T by wgmma from
  shared memory, the online softmax in registers (log2 units, exp2), then O += P V by wgmma
  with P as a register operand;
- one memory warpgroup streams K and V tiles by TMA into a ring of `stages` slots. Each slot
  has a "loaded" barrier (TMA bytes) and a "free" barrier both compute warpgroups arrive on.

The compute warpgroups meet at a shared barrier twice per step, offset by one meeting, so
while one runs its softmax the other has the tensor cores (FlashAttention-3's ping-pong). A
causal CTA's first warpgroup needs fewer steps than its second: it keeps arriving on the free
barriers and meetings of the steps it skips, so the ring and the ping-pong stay in step.

The backward runs on the saved o and lse: the Mosaic GPU dq and dk/dv kernels
(pallas_mosaic_gpu_bwd; AttentionBlockConfig.mgpu_backward, the Hopper default) or the Triton
ones (pallas_triton.backward).

Covers causal (q_offset >= 0) or full attention, GQA/MQA, bf16/f16, head_dim 64 or 128, any
lengths (padded here; padded keys masked). Window, sinks, segments, kv_valid, soft-cap and f32
raise UnsupportedError, so dispatch moves on to the Triton kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ops import _backend
from ops._backend import UnsupportedError
from ops._mosaic_gpu import require_hopper
from ops.attention import _blocks, pallas_mosaic_gpu_bwd, pallas_triton
from ops.attention._mgpu import (COMPUTE_WGS, LN2, LOG2E, SMEM_LIMIT, kernel_call, key_steps,
                                 pass_slot, product, register_ops, ring_loader, smem_transforms)
from ops.attention._blocks import Mask
from ops.attention.config import AttentionBlockConfig, default_config

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _forward(q, k, v, *, causal, scale, q_offset, kv_len, bq, bk, stages, heavy_first,
             interpret):
  """q [b, lq, h, d] with lq % (2 bq) == 0, k/v [b, lk, hk, d] with lk % bk == 0 (padded;
  keys >= kv_len are masked) -> o [b, lq, h, d], lse [b, h, lq] (natural log, f32)."""
  b, lq, h, d = q.shape
  group = h // k.shape[2]
  n_tiles = lq // (COMPUTE_WGS * bq)
  dtype = q.dtype
  c = scale * LOG2E
  steps = functools.partial(key_steps, bq=bq, bk=bk, causal=causal, q_offset=q_offset,
                            kv_len=kv_len)
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  layout, iota, _ = register_ops(interpret)

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, bufs, loaded, freed, sched):
    qo_smem, k_smem, v_smem, lse_smem = bufs
    k_loaded, v_loaded, q_loaded = loaded
    k_free, v_free = freed
    bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
    tile = lax.axis_index("q_tiles")
    if causal and heavy_first:
      tile = n_tiles - 1 - tile        # the longest CTAs first, the short ones fill the tail
    wg = lax.axis_index("wg")
    cta_row0 = tile * (COMPUTE_WGS * bq)
    _, cta_steps = steps(cta_row0 + (COMPUTE_WGS - 1) * bq)   # the last rows see the most keys

    def meet():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      row0 = cta_row0 + wg * bq
      full, total = steps(row0)
      q_smem = qo_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], q_smem, q_loaded.at[wg])
      plgpu.barrier_wait(q_loaded.at[wg])
      m = layout(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
      l = layout(jnp.full((bq,), 0.0, jnp.float32), row_layout)
      acc = layout(jnp.full((bq, d), 0.0, jnp.float32), wgmma_layout)
      plgpu.barrier_wait(k_loaded.at[0])       # every row sees key 0 (q_offset >= 0)
      pl.when(wg == 1)(meet)                  # offsets the two warpgroups by one meeting

      def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j, stages)

        # the meeting while the tensor cores work hands them to the other warpgroup next
        s = product(q_smem, k_smem.at[slot], (bq, bk), a_in_smem=True, b_transposed=True,
                    during=meet, interpret=interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
          cols = iota((bq, bk), 1) + j * bk
          ok = cols < kv_len
          if causal:
            rows = iota((bq, bk), 0)
            ok = ok & (cols <= rows + (row0 + q_offset))
          s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        # keeps the softmax ahead of the meeting below (else the compiler sinks it past)
        acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_loaded.at[slot])
        plgpu.barrier_wait(sched)

        def wait_next_k():       # under the P V wgmma
          @pl.when(j + 1 < total)
          def _():
            plgpu.barrier_wait(k_loaded.at[lax.rem(j + 1, stages)])

        acc = product(p16, v_smem.at[slot], acc.shape, a_in_smem=False, acc=acc,
                      during=wait_next_k, interpret=interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
      acc, m, l = lax.fori_loop(full, total, functools.partial(step, masked=True), carry)

      @pl.loop(total, cta_steps)
      def _skipped(j):
        pass_slot(lax.rem(j, stages), ((k_loaded, k_free), (v_loaded, v_free)))
        meet()
        meet()

      pl.when(wg == 0)(meet)                  # the last meeting of warpgroup 1
      acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
      q_smem[...] = acc.astype(dtype)         # Q's last reader (the last S wgmma) is done
      lse_smem.at[wg][...] = (m + jnp.log2(l)) * LN2
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(row0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")
      kv_head = lax.div(hi, group)

      def load(j, slot, ready):     # K's slot is refilled before V's is released
        keys = pl.ds(j * bk, bk)
        ready(k_free)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kv_head], k_smem.at[slot], k_loaded.at[slot])
        ready(v_free)
        plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kv_head], v_smem.at[slot], v_loaded.at[slot])

      ring_loader(cta_steps, stages, (k_free, v_free), load)

  def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
    tr = smem_transforms(d, dtype)
    pl.run_scoped(
        lambda bufs, loaded, freed, sched: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, bufs,
                                                  loaded, freed, sched),
        (plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
         plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
         plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        collective_axes="wg",
    )

  out_type = (jax.ShapeDtypeStruct((b, lq, h, d), dtype),
              jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
  return kernel_call(entry, out_type, (h, n_tiles, b), ("heads", "q_tiles", "batch"),
                     interpret)(q, k, v)


class _Static(tuple):
  """Hashable static arguments of the custom_vjp: fwd (the forward's keyword arguments as
  pairs; scale and interpret read from it), the Triton backward's mask and tiles (mask,
  cfg_d), and the Mosaic GPU backward's block and stages (bwd; empty = the Triton one)."""
  _fields = ("fwd", "mask", "cfg_d", "bwd")

  def __new__(cls, **kw):
    return super().__new__(cls, tuple(kw[f] for f in cls._fields))

  def __getattr__(self, name):
    if name in ("scale", "interpret"):
      return dict(self[0])[name]
    return self[self._fields.index(name)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, static):
  return _forward(q, k, v, **dict(static.fwd))


def _flash_fwd(q, k, v, static):
  o, lse = _forward(q, k, v, **dict(static.fwd))
  return (o, lse), (q, k, v, o, lse)


def _flash_bwd(static, res, cts):
  q, k, v, o, lse = res
  do, dlse = cts
  do, dlse = do.astype(o.dtype), dlse.astype(jnp.float32)
  if not static.bwd:
    return pallas_triton.backward(q, k, v, o, lse, do, dlse, mask=static.mask,
                                  scale=static.scale, cfg_d=static.cfg_d,
                                  interpret=static.interpret)
  fwd = dict(static.fwd)
  kw = dict(causal=fwd["causal"], scale=fwd["scale"], q_offset=fwd["q_offset"],
            kv_len=fwd["kv_len"], interpret=fwd["interpret"], **dict(static.bwd))
  delta = _blocks.bwd_delta(o, do, dlse)
  lse2 = lse * LOG2E
  dq = pallas_mosaic_gpu_bwd.dq(q, k, v, do, lse2, delta, **kw)
  dk, dv = pallas_mosaic_gpu_bwd.dkv(q, k, v, do, lse2, delta, **kw)
  return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check(q, k, v, *, causal, window, sinks, q_segment_ids, kv_valid, soft_cap, q_offset, cfg):
  if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise UnsupportedError(f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (Mosaic GPU attention: bf16 "
                           "or f16)")
  d, dv = q.shape[3], v.shape[3]
  if d != dv or d not in (64, 128):
    raise UnsupportedError(f"head_dim {d} / {dv}: Mosaic GPU attention takes 64 or 128, equal")
  if window is not None or sinks or q_segment_ids is not None or kv_valid is not None:
    raise UnsupportedError("window / sinks / segments / kv_valid (Mosaic GPU attention: causal "
                           "or full only)")
  if soft_cap is not None:
    raise UnsupportedError("soft_cap")
  if causal and q_offset < 0:
    raise UnsupportedError(f"causal with q_offset {q_offset} < 0 (queries without keys)")
  if not isinstance(cfg, AttentionBlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an AttentionBlockConfig")
  tile = d * q.dtype.itemsize        # bytes of one row of q, k, v or dO
  needs = {"forward (mgpu_block_q / mgpu_block_kv / mgpu_stages)":
           (COMPUTE_WGS * cfg.mgpu_block_q + 2 * cfg.mgpu_stages * cfg.mgpu_block_kv) * tile
           + COMPUTE_WGS * cfg.mgpu_block_q * 4}
  if cfg.mgpu_backward:
    # dq: Q, dO, lse, delta per warpgroup + a K/V ring; dk/dv: K, V per warpgroup + a ring of
    # Q, dO, lse, delta tiles (the two need the same bytes)
    bb = cfg.mgpu_bwd_block
    needs["backward (mgpu_bwd_block / mgpu_bwd_stages)"] = (
        COMPUTE_WGS * 2 * bb * (tile + 4) + cfg.mgpu_bwd_stages * 2 * bb * (tile + 4))
  for what, bytes_ in needs.items():
    # + 4 KiB of barriers and alignment: 128 keys x 3 stages (229,888 bytes of buffers) took
    # 232,568 of the H200's 232,448 and failed to compile
    if bytes_ + 4096 > SMEM_LIMIT:
      raise UnsupportedError(f"Mosaic GPU attention {what}: {bytes_} bytes of shared memory "
                             f"(+ 4 KiB > {SMEM_LIMIT}); fewer stages or smaller tiles")


def attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid, scale,
              soft_cap, q_offset, return_lse, interpret, config):
  """The "pallas_mosaic_gpu" implementation of ops.attention.attention; returns (o, lse)."""
  del return_lse, kv_segment_ids
  interpret = _backend.resolve_interpret(interpret, _backend.GPU)
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  if lq == 0 or lk == 0:
    raise UnsupportedError("empty sequence")
  cfg = config or default_config(d)
  _check(q, k, v, causal=causal, window=window, sinks=sinks, q_segment_ids=q_segment_ids,
         kv_valid=kv_valid, soft_cap=soft_cap, q_offset=q_offset, cfg=cfg)
  require_hopper(interpret)
  bq, bk = cfg.mgpu_block_q, cfg.mgpu_block_kv
  cfg_d, _, _ = pallas_triton.plan(cfg, b, lq, lk, h, hk)    # the backward's tiles
  # one padded length serves both kernels' tiles (all powers of two: the largest divides it)
  bb = cfg.mgpu_bwd_block      # the Mosaic GPU backward's tiles: 2 x bb rows / keys per CTA
  lq_p = _blocks.pad_len(lq, max(COMPUTE_WGS * bq, cfg_d["block_q"], cfg_d["bwd_block_q"],
                                 cfg_d["dkv_block_q"], COMPUTE_WGS * bb))
  lk_p = _blocks.pad_len(lk, max(bk, cfg_d["block_kv"], cfg_d["bwd_block_kv"],
                                 cfg_d["dkv_block_kv"], COMPUTE_WGS * bb))
  stages = min(cfg.mgpu_stages, lk_p // bk)     # no slot the keys cannot fill
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  mask = Mask(causal=causal, window=None, sinks=0, q_offset=q_offset, q_len=lq, kv_len=lk,
              has_segments=False, has_valid=False)
  fwd = (("causal", bool(causal)), ("scale", float(scale)), ("q_offset", int(q_offset)),
         ("kv_len", lk), ("bq", bq), ("bk", bk), ("stages", stages),
         ("heavy_first", bool(cfg.mgpu_heavy_first)), ("interpret", interpret))
  bwd = ((("block", bb), ("stages", min(cfg.mgpu_bwd_stages, lk_p // bb)))
         if cfg.mgpu_backward else ())
  static = _Static(fwd=fwd, mask=mask, cfg_d=cfg_d, bwd=bwd)
  o, lse = _flash(pad(q, lq_p), pad(k, lk_p), pad(v, lk_p), static)
  return o[:, :lq], lse[:, :, :lq]
