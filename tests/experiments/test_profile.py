"""experiments/bench/profile.py: per-kernel device time from a Perfetto trace."""
import jax
import jax.numpy as jnp

from experiments.bench import profile


def _meta(pid, name):
  return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_summarize_counts_device_events_only_largest_first():
  events = [
      _meta(1, "/host:CPU"), _meta(7, "/device:GPU:0"), _meta(8, "/device:TPU:1"),
      {"ph": "X", "pid": 7, "name": "gemm", "dur": 1500.0},
      {"ph": "X", "pid": 7, "name": "gemm", "dur": 500.0},
      {"ph": "X", "pid": 8, "name": "fusion", "dur": 3000.0},
      {"ph": "X", "pid": 1, "name": "host_work", "dur": 9e6},      # host: ignored
      {"ph": "i", "pid": 7, "name": "marker"},                        # not complete: ignored
  ]
  rows = profile.summarize_trace(events)
  assert [(r.name, r.total_ms, r.count) for r in rows] == [("fusion", 3.0, 1), ("gemm", 2.0, 2)]
  assert [r.name for r in profile.summarize_trace(events, top=1)] == ["fusion"]
  table = profile.format_kernel_table(rows, iters=2, title="t")
  assert "| gemm | 1.000 | 40% | 1 |" in table


def test_kernel_times_runs_a_real_trace(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  prof = profile.kernel_times(f, jnp.ones((64, 64)), iters=2, trace_dir=str(tmp_path))
  # a CPU trace has no device process; on an accelerator every row is a device kernel
  if jax.default_backend() == "cpu":
    assert prof.rows == [] and prof.totals is None
  else:
    assert prof.rows and all(r.total_ms >= 0 for r in prof.rows)
    assert 0 < prof.totals.busy_ms <= prof.totals.span_ms


def test_device_totals_busy_idle_and_other_row():
  """Two devices: GPU:0 runs kernels at [0, 100) and [50, 150) µs (overlapping) and [400, 500);
  GPU:1 runs one at [0, 200). Per device: kernels (300 + 200) / 2, busy (250 + 200) / 2, span
  (500 + 200) / 2 µs."""
  events = [_meta(7, "/device:GPU:0"), _meta(9, "/device:GPU:1"), _meta(1, "/host:CPU"),
            {"ph": "X", "pid": 7, "name": "a", "ts": 0.0, "dur": 100.0},
            {"ph": "X", "pid": 7, "name": "b", "ts": 50.0, "dur": 100.0},
            {"ph": "X", "pid": 7, "name": "c", "ts": 400.0, "dur": 100.0},
            {"ph": "X", "pid": 9, "name": "a", "ts": 0.0, "dur": 200.0},
            {"ph": "X", "pid": 1, "name": "host", "ts": 0.0, "dur": 9e6}]
  t = profile.device_totals(events)
  assert (t.kernel_ms, t.busy_ms, t.span_ms) == (0.25, 0.225, 0.35)
  assert profile.device_totals([_meta(1, "/host:CPU")]) is None
  rows = profile.summarize_trace(events)
  prof = profile.KernelProfile(rows[:1], t, sum(r.total_ms for r in rows[1:]),
                               sum(r.count for r in rows[1:]))
  table = profile.format_kernel_table(prof, iters=1)
  assert "device busy 0.225 ms of 0.350 ms" in table and "(36% idle)" in table
  assert "| a | 0.300 | 60% | 2 |" in table
  assert "| (the other kernels) | 0.200 | 40% | 2 |" in table
