"""Where the device time of a jitted call goes: per-kernel totals from a JAX profiler trace.

  prof = kernel_times(jax.jit(f), x, y, iters=3)
  print(format_kernel_table(prof, iters=3))

Uses `jax.profiler.trace(..., create_perfetto_trace=True)` and reads the Perfetto JSON it
writes (no TensorBoard or xprof needed), summing the complete events of the device processes
("/device:GPU:N", "/device:TPU:N") by name. Host-side events are left out; the line above the
table says how much of the span from the first kernel to the last the device was busy (a
step's idle gaps: launches, host waits), and time_fn says how long the step took.
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


@dataclasses.dataclass
class DeviceTotals:
  """Per device, averaged over the device processes of a trace (ms over all traced calls):
  kernel_ms sums every kernel's duration (overlapping kernels count twice), busy_ms is the
  time at least one kernel ran, span_ms from the first kernel's start to the last one's end."""
  kernel_ms: float
  busy_ms: float
  span_ms: float


def _device_pids(events: list) -> set:
  return {e["pid"] for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"
          and str(e.get("args", {}).get("name", "")).startswith(_DEVICE_PREFIXES)}


def device_totals(events: Iterable[dict]) -> DeviceTotals | None:
  """Busy and idle time of the devices in a trace; None without device kernels."""
  events = list(events)
  pids = _device_pids(events)
  spans = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in pids and "ts" in e:
      start = float(e["ts"])
      spans[e["pid"]].append((start, start + float(e.get("dur", 0.0))))
  if not spans:
    return None
  kernel = busy = span = 0.0
  for iv in spans.values():
    iv.sort()
    kernel += sum(b - a for a, b in iv)
    span += iv[-1][1] - iv[0][0]
    end = iv[0][0]
    for a, b in iv:           # union of the intervals
      busy += max(0.0, b - max(a, end))
      end = max(end, b)
  n = len(spans) * 1e3        # µs -> ms, averaged over devices
  return DeviceTotals(kernel / n, busy / n, span / n)


def summarize_trace(events: Iterable[dict], top: int | None = None) -> list[KernelTime]:
  """Per-name totals of complete ('X') events on device processes, largest first."""
  events = list(events)
  device_pids = _device_pids(events)
  total = collections.defaultdict(float)
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      total[e["name"]] += float(e.get("dur", 0.0)) / 1e3   # Perfetto durations are in µs
      count[e["name"]] += 1
  rows = sorted((KernelTime(n, total[n], count[n]) for n in total), key=lambda r: -r.total_ms)
  return rows[:top] if top else rows


@dataclasses.dataclass
class KernelProfile:
  rows: list            # KernelTime, largest first (the `top` of them)
  totals: DeviceTotals | None
  other_ms: float = 0.0   # kernels below the top rows
  other_count: int = 0


def kernel_times(fn: Callable, *args, iters: int = 3, top: int | None = 25,
                 trace_dir: str | None = None) -> KernelProfile:
  """Traces `iters` calls of fn(*args) (after one warm-up call): device time per kernel and
  the devices' busy / idle time."""
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
  rows = summarize_trace(events)
  rest = rows[top:] if top else []
  return KernelProfile(rows[:top] if top else rows, device_totals(events),
                       sum(r.total_ms for r in rest), sum(r.count for r in rest))


def format_kernel_table(prof: KernelProfile | list[KernelTime], iters: int = 1,
                        title: str = "") -> str:
  """Markdown table: kernel, ms per call, share of all kernel time, launches per call; with a
  KernelProfile also a row for the kernels below the top and a line of busy / idle time."""
  if not isinstance(prof, KernelProfile):
    prof = KernelProfile(list(prof), None)
  rows = list(prof.rows)
  if prof.other_count:
    rows.append(KernelTime("(the other kernels)", prof.other_ms, prof.other_count))
  all_ms = sum(r.total_ms for r in rows) or 1.0
  lines = ([f"### {title}"] if title else [])
  t = prof.totals
  if t:
    idle = 1.0 - t.busy_ms / t.span_ms if t.span_ms else 0.0
    lines.append(f"per call: kernels {t.kernel_ms / iters:.3f} ms, device busy "
                 f"{t.busy_ms / iters:.3f} ms of {t.span_ms / iters:.3f} ms from first kernel "
                 f"to last ({idle:.0%} idle)")
  lines += ["| kernel | ms / call | share | launches / call |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.name[:90]} | {r.total_ms / iters:.3f} | {r.total_ms / all_ms:.0%} | "
                 f"{r.count / iters:g} |")
  return "\n".join(lines)
