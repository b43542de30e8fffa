"""Benchmark of ops.scan.linear_scan: Pallas kernels vs lax.associative_scan ("xla") and lax.scan.

Bytes counted (GB/s column): forward reads a and b and writes h once (+ h0 / h_last rows);
backward reads a, h and the cotangent g and writes da and db once. "fwd+bwd" is one jitted
jax.vjp call (forward + backward), counted as the sum of both. Ratios: "copy" = achieved GB/s
over the HBM copy bandwidth measured in the same run; "assoc" / "lax.scan" = baseline time over
this row's time (> 1 means faster than the baseline). Shape sets carry their own dtypes
(the driver's --dtype flag is not used).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from experiments.bench import timing
from ops.scan import ScanConfig, implementations, linear_scan, reference
from ops.scan.shapes import SHAPES

# A few alternative Triton configs timed on the first shape (a small on-line sweep).
SWEEP = [
    dict(block_c=32, num_warps=1, time_chunk=32, bwd_block_c=32, bwd_num_warps=1,
         bwd_time_chunk=24),
    dict(block_c=64, num_warps=2, time_chunk=48, bwd_block_c=64, bwd_num_warps=2,
         bwd_time_chunk=32),
    dict(block_c=128, num_warps=4, time_chunk=32, bwd_block_c=128, bwd_num_warps=4,
         bwd_time_chunk=24),
    dict(block_c=64, num_warps=1, time_chunk=16, bwd_block_c=64, bwd_num_warps=1,
         bwd_time_chunk=12),
]
SWEEP_BUDGET_S = 40.0
# besides the device default: time segments of both directions (ops/scan/pallas_triton_segments.py)
# chained (ops/_triton_chain.py), and the serial kernels (segment 0). No look-back rows: it is
# refused outside interpret mode since the LIF one segfaulted in the Triton compiler (session 12).
VARIANTS = [dict(segment=0, bwd_segment=0), dict(segment=32, bwd_segment=32),
            dict(segment=64, bwd_segment=64)]


def _fns(impl, config, reverse=False):
  if impl == "lax.scan":
    scan = lambda a, b: reference.linear_scan_sequential(a, b, reverse=reverse)
  else:
    scan = lambda a, b: linear_scan(a, b, reverse=reverse, implementation=impl, config=config)

  def fwd(a, b):
    return scan(a, b)

  def fwd_bwd(a, b, g):
    out, vjp = jax.vjp(lambda a, b: scan(a, b)[0], a, b)
    return out, vjp(g)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def run(shapes: str = "bench", dtype: str = "float32", ceilings=None) -> list[timing.Row]:
  del dtype
  rows = []
  copy = ceilings.gbs if ceilings is not None else None
  on_gpu = jax.default_backend() == "gpu"
  t_start = time.perf_counter()
  for n, (B, T, C, dt, a_const) in enumerate(SHAPES[shapes]):
    dt = jnp.dtype(dt)
    k = jax.random.split(jax.random.key(0), 3)
    b = jax.random.normal(k[0], (B, T, C), jnp.float32).astype(dt)
    a_shape = (C,) if a_const else (B, T, C)
    a = jax.random.uniform(k[1], a_shape, jnp.float32, 0.9, 1.0).astype(dt)
    g = jax.random.normal(k[2], (B, T, C), jnp.float32).astype(dt)
    big = B * T * C * dt.itemsize
    a_bytes = a.size * dt.itemsize
    small = B * C * 4
    fwd_bytes = a_bytes + 2 * big + 2 * small
    bwd_bytes = 2 * a_bytes + 3 * big + 2 * small
    shape = f"B{B} T{T} C{C} {dt.name}" + (" a[C]" if a_const else "")
    impls = [(nm, None, False) for nm in ("pallas_triton", "pallas_mosaic_gpu")
             if nm in implementations() and on_gpu]
    if on_gpu:
      default = ScanConfig.for_device(jax.devices()[0].device_kind)
      impls += [("pallas_triton(" + ", ".join(f"{k}={v}" for k, v in var.items()) + ")",
                 dataclasses.replace(default, **var), False) for var in VARIANTS]
    if n == 0 and on_gpu:
      impls += [(f"pallas_triton{tuple(s.values())}", ScanConfig(**s), True) for s in SWEEP]
    impls += [("xla", None, False), ("lax.scan", None, False)]
    base = {}
    for name, cfg, optional in impls:
      if optional and time.perf_counter() - t_start > SWEEP_BUDGET_S:
        continue
      impl = name.split("(")[0]
      fwd, fwd_bwd = _fns(impl, cfg)
      for kind, fn, args, nbytes in (("fwd", fwd, (a, b), fwd_bytes),
                                     ("fwd+bwd", fwd_bwd, (a, b, g), fwd_bytes + bwd_bytes)):
        try:
          # back-to-back calls, as in bench gmm / lif
          ms = timing.time_pipelined(fn, *args, calls=50, max_batch_s=0.3)
        except Exception as e:  # report, keep benchmarking the rest
          rows.append(timing.Row("scan", f"{shape} {kind}", name, float("nan"),
                                 note=f"failed: {type(e).__name__}: {str(e)[:80]}"))
          continue
        gbs = nbytes / (ms * 1e-3) / 1e9
        if impl in ("xla", "lax.scan") and cfg is None:
          base[(impl, kind)] = ms
        row = timing.Row("scan", f"{shape} {kind}", name, ms, gbs=gbs)
        if copy:
          row.ratios["copy"] = gbs / copy
        rows.append(row)
        print(timing.format_table([row]).splitlines()[-1], flush=True)
    for r in rows:
      if r.shape.startswith(shape + " "):
        kind = r.shape[len(shape) + 1:]
        for bname, key in (("assoc", "xla"), ("lax.scan", "lax.scan")):
          if (key, kind) in base and r.ms == r.ms:
            r.ratios[bname] = base[(key, kind)] / r.ms
  return rows
