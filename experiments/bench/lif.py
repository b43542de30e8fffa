"""Benchmark of ops.lif.lif: Pallas kernels vs the lax.scan reference ("xla").

Bytes counted (GB/s column): forward reads x and writes spikes once (+ v0 / v_last rows);
backward reads x and the spike cotangent and writes dx once. "fwd+bwd" is one jitted jax.vjp
call, counted as the sum of both (the Triton forward additionally writes a membrane checkpoint
every ckpt_every steps, 1/ckpt_every of a row per step, not counted). Ratios: "copy" = achieved
GB/s over the HBM copy bandwidth measured in the same run; "lax.scan" = baseline time over this
row's time. Shape sets carry their own dtypes (the driver's --dtype flag is not used).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from experiments.bench import timing
from ops.lif import LifConfig, implementations, lif
from ops.lif.shapes import SHAPES

SWEEP = [
    dict(block_c=32, num_warps=1, time_chunk=64, ckpt_every=16, bwd_block_c=32, bwd_num_warps=1),
    dict(block_c=64, num_warps=2, time_chunk=32, ckpt_every=16, bwd_block_c=64, bwd_num_warps=2),
    dict(block_c=128, num_warps=4, time_chunk=64, ckpt_every=32, bwd_block_c=128,
         bwd_num_warps=4),
    dict(block_c=64, num_warps=1, time_chunk=32, ckpt_every=8, bwd_block_c=64, bwd_num_warps=1),
]
SWEEP_BUDGET_S = 30.0
# besides the device default: the chained backward's segment length (0: the serial kernel) and
# hand-off (ops/lif/pallas_triton_segments.py, ops/_triton_chain.py). No look-back rows: its compile
# segfaulted on the H200 (session 12), and the kernel now refuses it outside interpret mode.
# The forward in time segments on 128-channel programs (ops/lif/pallas_triton_fwd_segments.py):
# faster on the bench input, slower where spikes are rare (LifConfig's docstring); and the
# chained backward instead of the (default) replayed-carry one, and the replay without its
# chunk prefetch (ops/lif/pallas_triton_bwd_replay.py), and the replay on session 17's tiles
# (128 channels on 4 warps, 16-step chunks).
VARIANTS = [dict(bwd_replay=0, bwd_segment=0), dict(bwd_replay=0, bwd_segment=64),
            dict(bwd_replay=0), dict(bwd_replay_prefetch=False),
            dict(bwd_replay_num_warps=4, ckpt_every=16),
            dict(segment=1024, block_c=128)]


def _fns(impl, config):
  f = lambda x: lif(x, implementation=impl, config=config)

  def fwd_bwd(x, g):
    out, vjp = jax.vjp(lambda x: f(x)[0], x)
    return out, vjp(g)

  return jax.jit(f), jax.jit(fwd_bwd)


def run(shapes: str = "bench", dtype: str = "float32", ceilings=None) -> list[timing.Row]:
  del dtype
  rows = []
  copy = ceilings.gbs if ceilings is not None else None
  on_gpu = jax.default_backend() == "gpu"
  t_start = time.perf_counter()
  for n, (B, T, C, dt) in enumerate(SHAPES[shapes]):
    dt = jnp.dtype(dt)
    k = jax.random.split(jax.random.key(0), 2)
    x = (1.2 * jax.random.normal(k[0], (B, T, C), jnp.float32)).astype(dt)
    g = jax.random.normal(k[1], (B, T, C), jnp.float32).astype(dt)
    big = B * T * C * dt.itemsize
    small = B * C * 4
    fwd_bytes = 2 * big + 2 * small
    bwd_bytes = 3 * big + 2 * small
    shape = f"B{B} T{T} C{C} {dt.name}"
    impls = [(nm, None, False) for nm in ("pallas_triton", "pallas_mosaic_gpu")
             if nm in implementations() and on_gpu]
    if on_gpu:
      default = LifConfig.for_device(jax.devices()[0].device_kind)
      impls += [("pallas_triton(" + ", ".join(f"{k}={v}" for k, v in var.items()) + ")",
                 dataclasses.replace(default, **var), False) for var in VARIANTS]
    if n == 0 and on_gpu:
      impls += [(f"pallas_triton{tuple(s.values())}", LifConfig(**s), True) for s in SWEEP]
    impls += [("xla", None, False)]
    base = {}
    for name, cfg, optional in impls:
      if optional and time.perf_counter() - t_start > SWEEP_BUDGET_S:
        continue
      impl = name.split("(")[0]
      fwd, fwd_bwd = _fns(impl, cfg)
      for kind, fn, args, nbytes in (("fwd", fwd, (x,), fwd_bytes),
                                     ("fwd+bwd", fwd_bwd, (x, g), fwd_bytes + bwd_bytes)):
        try:
          # back-to-back calls, as in bench gmm (one synchronised call at a time also
          # measures the GPU clocking down between sub-millisecond calls)
          ms = timing.time_pipelined(fn, *args, calls=50, max_batch_s=0.3)
        except Exception as e:  # report, keep benchmarking the rest
          rows.append(timing.Row("lif", f"{shape} {kind}", name, float("nan"),
                                 note=f"failed: {type(e).__name__}: {str(e)[:80]}"))
          continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        if impl == "xla":
          base[kind] = ms
        row = timing.Row("lif", f"{shape} {kind}", name, ms, gbs=gbs)
        if copy:
          row.ratios["copy"] = gbs / copy
        rows.append(row)
        print(timing.format_table([row]).splitlines()[-1], flush=True)
    for r in rows:
      if r.shape.startswith(shape + " "):
        kind = r.shape[len(shape) + 1:]
        if kind in base and r.ms == r.ms:
          r.ratios["lax.scan"] = base[kind] / r.ms
  return rows
