"""experiments/bench_decode.py on the CPU: one row per preset and cache length, bad flags refused."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_decode.py"), *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_rows_per_preset_and_cache_length():
  proc = run_bench("--config=tiny_cpu,tiny_nsa_cpu", "--batch=2", "--cache_len=40,72",
                   "--steps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in proc.stdout.splitlines() if line.startswith("| tiny_")]
  assert [(r[0], r[1]) for r in rows] == [("tiny_cpu", "40"), ("tiny_cpu", "72"),
                                          ("tiny_nsa_cpu", "40"), ("tiny_nsa_cpu", "72")]
  assert rows[0][4] == rows[1][4] == "1.00×"     # the first preset is the reference
  assert all(float(r[2]) > 0 and float(r[4].rstrip("×")) > 0 for r in rows)


def test_cache_shorter_than_the_loop_is_refused():
  proc = run_bench("--config=tiny_cpu", "--cache_len=8", "--steps=8")
  assert proc.returncode != 0
  assert "every --cache_len > steps + 1" in proc.stderr
