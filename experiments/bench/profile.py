"""Where the device time of a jitted call goes: per-kernel totals from a JAX profiler trace.

  rows = kernel_times(jax.jit(f), x, y, iters=3)
  print(format_kernel_table(rows, iters=3))

Uses `jax.profiler.trace(..., create_perfetto_trace=True)` and reads the Perfetto JSON it
writes (no TensorBoard or xprof needed), summing the complete events of the device processes
("/device:GPU:N", "/device:TPU:N") by name. Host-side events are left out, so the table answers
"which kernel", not "how long did the step take" (time_fn does that).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import tempfile
from typing import Callable, Iterable

import jax

_DEVICE_PREFIXES = ("/device:GPU", "/device:TPU")


@dataclasses.dataclass
class KernelTime:
  name: str
  total_ms: float
  count: int


def summarize_trace(events: Iterable[dict], top: int | None = None) -> list[KernelTime]:
  """Per-name totals of complete ('X') events on device processes, largest first."""
  events = list(events)
  device_pids = {e["pid"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and str(e.get("args", {}).get("name", "")).startswith(_DEVICE_PREFIXES)}
  total = collections.defaultdict(float)
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      total[e["name"]] += float(e.get("dur", 0.0)) / 1e3   # Perfetto durations are in µs
      count[e["name"]] += 1
  rows = sorted((KernelTime(n, total[n], count[n]) for n in total), key=lambda r: -r.total_ms)
  return rows[:top] if top else rows


def kernel_times(fn: Callable, *args, iters: int = 3, top: int | None = 25,
                 trace_dir: str | None = None) -> list[KernelTime]:
  """Traces `iters` calls of fn(*args) (after one warm-up call) and sums device time per kernel."""
  jax.block_until_ready(fn(*args))
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxlm_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(iters):
      jax.block_until_ready(fn(*args))
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return summarize_trace(events, top)


def format_kernel_table(rows: list[KernelTime], iters: int = 1, title: str = "") -> str:
  """Markdown table: kernel, ms per call, share of the listed device time, launches per call."""
  all_ms = sum(r.total_ms for r in rows) or 1.0
  lines = ([f"### {title}"] if title else []) + [
      "| kernel | ms / call | share | launches / call |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.name[:90]} | {r.total_ms / iters:.3f} | {r.total_ms / all_ms:.0%} | "
                 f"{r.count / iters:g} |")
  return "\n".join(lines)
