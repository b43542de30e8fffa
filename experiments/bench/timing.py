"""Timing and hardware ceilings shared by every benchmark.

Times are medians over repeated runs after warm-up, synchronised with
`block_until_ready`. Ceilings (matmul TFLOP/s, copy GB/s) are measured in the
same process so ratios compare like with like.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable, *args, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time of `fn(*args)` in milliseconds (device-synchronised)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3)


def time_pipelined(fn: Callable, *args, calls: int = 200, repeats: int = 3,
                   max_batch_s: float | None = None) -> float:
  """Milliseconds per call of `calls` back-to-back calls synchronised once at the end (best of
  `repeats`): device throughput, as in a generation loop that dispatches asynchronously. For
  calls of tens of microseconds, time_fn mostly measures the host's dispatch and the sync.
  max_batch_s: fewer calls (at least 3) when one synchronised call says `calls` of them would
  take longer than this (slow baselines in a sweep)."""
  jax.block_until_ready(fn(*args))
  if max_batch_s is not None:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    calls = int(max(3, min(calls, max_batch_s / max(one, 1e-9))))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / calls)
  return best * 1e3


def time_in_loop(fn: Callable, x, *consts, steps: int = 64, repeats: int = 5) -> float:
  """Milliseconds per step of `steps` calls of fn(x, *consts) -> y (y.shape == x.shape) inside
  ONE jitted fori_loop, each step's x = previous x + 1e-3 * y so no call can be hoisted or
  dropped (best of `repeats` synchronised loops). Device time with no host dispatch per call:
  what a generation loop under lax.scan (jaxlm.generate) sees. time_pipelined instead pays one
  host dispatch per call, which hides device work shorter than the dispatch."""

  @jax.jit
  def loop(x, *consts):
    step = lambda i, x: x + (fn(x, *consts) * 1e-3).astype(x.dtype)
    return jax.lax.fori_loop(0, steps, step, x)

  jax.block_until_ready(loop(x, *consts))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(x, *consts))
    best = min(best, time.perf_counter() - t0)
  return best / steps * 1e3


def _best_ms(fn: Callable, *args, warmup_s: float = 1.0, repeats: int = 10) -> float:
  """Fastest of `repeats` timed calls after at least warmup_s of back-to-back calls.

  Ceilings use the best time, not the median: they estimate what the hardware can do, and
  the first hundreds of milliseconds on a GPU run at lower clocks (session 4 and 5 saw the same
  H200 measure 527 to 698 TFLOP/s with a 3-call warm-up and a median).
  """
  t_end = time.perf_counter() + warmup_s
  jax.block_until_ready(fn(*args))
  while time.perf_counter() < t_end:
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best * 1e3


def matmul_peak_tflops(n: int = 8192, dtype=jnp.bfloat16, reps: int = 8,
                       warmup_s: float = 1.0) -> float:
  """Achieved dense matmul rate (TFLOP/s) of n×n×n products: the compute ceiling.

  `reps` products run inside one jitted loop so per-call dispatch is not part of the time.
  """
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)

  @jax.jit
  def chain(a, b):
    # each product depends on the previous one, so XLA cannot drop or merge them
    return jax.lax.fori_loop(0, reps, lambda i, x: (x @ b) * jnp.asarray(1e-2, dtype), a)

  ms = _best_ms(chain, a, b, warmup_s=warmup_s)
  return 2 * n**3 * reps / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(n_bytes: int = 2 << 30, warmup_s: float = 0.5) -> float:
  """Achieved HBM bandwidth (GB/s) of a large device copy, bytes read + written."""
  x = jax.random.normal(jax.random.key(1), (n_bytes // 4,), jnp.float32)
  ms = _best_ms(jax.jit(lambda v: v * 1.0000001), x, warmup_s=warmup_s)
  return 2 * n_bytes / (ms * 1e-3) / 1e9


@dataclasses.dataclass
class Row:
  """One line of a benchmark table."""
  op: str
  shape: str
  impl: str
  ms: float
  tflops: float | None = None
  gbs: float | None = None
  ratios: dict[str, float] = dataclasses.field(default_factory=dict)
  note: str = ""


def rescale_copy_ratios(rows: list[Row], copy_gbs: float) -> bool:
  """Sets every row's "copy" ratio to its GB/s over copy_gbs; whether any row had one."""
  found = False
  for r in rows:
    if "copy" in r.ratios and r.gbs:
      r.ratios["copy"] = r.gbs / copy_gbs
      found = True
  return found


def format_table(rows: list[Row], title: str = "") -> str:
  ratio_keys = sorted({k for r in rows for k in r.ratios})
  head = ["op", "shape", "impl", "ms", "TFLOP/s", "GB/s"] + [f"x vs {k}" for k in ratio_keys] + ["note"]
  lines = [f"### {title}"] if title else []
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  fmt = lambda v, p: "" if v is None else f"{v:.{p}f}"
  for r in rows:
    cells = [r.op, r.shape, r.impl, fmt(r.ms, 3), fmt(r.tflops, 1), fmt(r.gbs, 0)]
    cells += [fmt(r.ratios.get(k), 2) for k in ratio_keys] + [r.note]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
