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
  rows = profile.kernel_times(f, jnp.ones((64, 64)), iters=2, trace_dir=str(tmp_path))
  # a CPU trace has no device process; on an accelerator every row is a device kernel
  if jax.default_backend() == "cpu":
    assert rows == []
  else:
    assert rows and all(r.total_ms >= 0 for r in rows)
