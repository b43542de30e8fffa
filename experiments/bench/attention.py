"""Attention benchmark: every implementation that runs here vs cuDNN and XLA.

Forward and forward+backward times, TFLOP/s (causal FLOPs = half of 4·B·H·T²·D; a window
counts its visible keys; backward = 2.5× forward) and the ratio to cuDNN in the same run.
Also a flash-decoding row set (GB/s of KV cache read).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

import ops.attention as A
from ops.attention.shapes import SHAPES
from experiments.bench import timing

# The XLA reference materialises [B, H, T, T] f32 scores: skip it past this length.
XLA_MAX_SEQ = 8192
DECODE_SHAPES = {
    "ci": ((2, 1, 1024, 8, 2, 64),),
    "bench": ((8, 1, 32768, 32, 8, 128), (8, 4, 32768, 32, 8, 128), (1, 1, 131072, 32, 8, 128)),
}


def _impls():
  """(row label, implementation, config) of each implementation registered for this platform
  (and "xla"); on GPU also the Mosaic GPU forward with the Triton backward (the Hopper default
  is the Mosaic GPU backward)."""
  from ops import _backend
  from ops.attention.config import default_config
  reg = A.api._ATTENTION._impls
  here = _backend.platform()
  names = [n for n in ("pallas_mosaic_gpu", "pallas_triton", "pallas_tpu", "splash", "cudnn",
                       "xla") if n in reg and (n == "xla" or here in reg[n].platforms)]
  rows = [(n, n, None) for n in names]
  if "pallas_mosaic_gpu" in names:
    rows.insert(1, ("pallas_mosaic_gpu+triton_bwd", "pallas_mosaic_gpu",
                    default_config().replace(mgpu_backward=False)))
  return rows


def _err(e):
  return f"error: {type(e).__name__}: " + " ".join(str(e).split())[:160]


def run(shapes: str = "bench", dtype: str = "bfloat16", ceilings=None) -> list[timing.Row]:
  dt = jnp.dtype(dtype)
  rows: list[timing.Row] = []
  for s in SHAPES[shapes]:
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (s.batch, s.seq, s.heads, s.head_dim), dt)
    k = jax.random.normal(ks[1], (s.batch, s.seq, s.kv_heads, s.head_dim), dt)
    v = jax.random.normal(ks[2], (s.batch, s.seq, s.kv_heads, s.head_dim), dt)
    do = jax.random.normal(ks[3], q.shape, dt)
    kw = dict(causal=s.causal, window=s.window)
    flops = s.fwd_flops()
    base = {}
    shape_rows = []
    for label, impl, cfg in _impls():
      if impl == "xla" and s.seq > XLA_MAX_SEQ:
        shape_rows.append(timing.Row("attention fwd", s.name, label, float("nan"),
                                     note=f"skipped: O(T^2) memory above T={XLA_MAX_SEQ}"))
        continue
      fwd = jax.jit(lambda q, k, v, impl=impl, cfg=cfg: A.attention(
          q, k, v, implementation=impl, config=cfg, **kw))
      fb = jax.jit(jax.grad(
          lambda q, k, v, impl=impl, cfg=cfg: jnp.sum(
              A.attention(q, k, v, implementation=impl, config=cfg, **kw).astype(jnp.float32) *
              do.astype(jnp.float32)), argnums=(0, 1, 2)))
      for mode, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", fb, 3.5 * flops)):
        try:
          ms = timing.time_fn(fn, q, k, v, warmup=2, iters=10)
        except Exception as e:  # report, keep benchmarking the others
          shape_rows.append(timing.Row(f"attention {mode}", s.name, label, float("nan"),
                                       note=_err(e)))
          continue
        if impl == "cudnn":
          base[mode] = ms
        shape_rows.append(timing.Row(f"attention {mode}", s.name, label, ms,
                                     tflops=fl / (ms * 1e-3) / 1e12))
    for r in shape_rows:
      mode = r.op.split()[-1]
      if mode in base and r.ms == r.ms:
        r.ratios["cudnn (speed)"] = base[mode] / r.ms
    rows += shape_rows
    for r in shape_rows:  # progressive output (long runs may be cut off)
      print(f"{r.op} | {r.shape} | {r.impl} | {r.ms:.3f} ms | {r.tflops or 0:.1f} TFLOP/s | "
            f"{r.ratios} {r.note}", flush=True)

  for (b, lq, max_len, h, hk, d) in DECODE_SHAPES[shapes]:
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, lq, h, d), dt)
    kc = jax.random.normal(ks[1], (b, max_len, hk, d), dt)
    vc = jax.random.normal(ks[2], (b, max_len, hk, d), dt)
    lengths = jnp.full((b,), max_len, jnp.int32)
    name = f"decode B{b} q{lq} L{max_len} H{h}/KV{hk} D{d}"
    nbytes = 2 * b * max_len * hk * d * dt.itemsize
    base = None
    for impl in [n for n in ("pallas_triton", "xla") if n in A.decode_implementations()
                 and (n == "xla" or jax.default_backend() == "gpu")]:
      fn = jax.jit(lambda q, kc, vc, n, impl=impl: A.decode_attention(q, kc, vc, n,
                                                                      implementation=impl))
      try:
        ms = timing.time_fn(fn, q, kc, vc, lengths, warmup=2, iters=20)
      except Exception as e:
        rows.append(timing.Row("decode", name, impl, float("nan"),
                               note=_err(e)))
        continue
      row = timing.Row("decode", name, impl, ms, gbs=nbytes / (ms * 1e-3) / 1e9)
      if impl == "xla":
        base = ms
      rows.append(row)
    for r in rows[-2:]:
      if base and r.op == "decode" and r.ms == r.ms:
        r.ratios["xla (speed)"] = base / r.ms
  return rows
