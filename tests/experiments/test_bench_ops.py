"""experiments/bench_ops.py: the ceilings measured twice and the copy ratios against the
higher (fake timings and a fake op module, so the GPU path runs on the CPU)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FAKE_GPU_RUN = """
import sys
import jax
from absl import app
import experiments.bench.scan as scan_bench
from experiments import bench_ops
from experiments.bench import timing
copies, peaks = iter([1000.0, 1250.0]), iter([600.0, 500.0])
timing.copy_bandwidth_gbs = lambda: next(copies)
timing.matmul_peak_tflops = lambda: next(peaks)
jax.default_backend = lambda: "gpu"

def run(shapes, dtype, ceilings):
  row = timing.Row("scan fwd", "B1", "pallas_triton", 1.0, gbs=900.0)
  row.ratios["copy"] = row.gbs / ceilings.gbs
  return [row]
scan_bench.run = run
sys.argv = ["bench_ops", "--op=scan", "--out=" + sys.argv[1]]
app.run(bench_ops.main)
"""


def test_copy_ratios_are_against_the_higher_of_two_copy_measurements(tmp_path):
  out = tmp_path / "bench.md"
  proc = subprocess.run([sys.executable, "-c", _FAKE_GPU_RUN, str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 0.90 |" in proc.stdout           # printed as the op ran: 900 / 1000
  text = out.read_text()
  assert "| 0.72 |" in text and "| 0.90 |" not in text     # 900 / 1250 in the file
  assert "| 600.0 | 1250 |" in text          # the higher peak and the higher copy
  assert "copy before the ops: 1000 GB/s" in text


def test_rescale_copy_ratios_only_touches_copy_ratios():
  from experiments.bench import timing
  a = timing.Row("lif", "s", "x", 1.0, gbs=500.0, ratios={"copy": 0.5, "lax.scan": 9.0})
  b = timing.Row("attention", "s", "y", 1.0, tflops=100.0, ratios={"cudnn (speed)": 1.1})
  assert timing.rescale_copy_ratios([a, b], 2000.0)
  assert a.ratios == {"copy": 0.25, "lax.scan": 9.0} and b.ratios == {"cudnn (speed)": 1.1}
  assert not timing.rescale_copy_ratios([b], 2000.0)
