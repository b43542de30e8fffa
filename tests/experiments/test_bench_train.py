"""experiments/bench_train.py on simulated CPU devices: the device-count sweep and its errors."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(*args, devices=2, timeout=300):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["PYTHONPATH"] = ROOT
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_train.py"), "--config=tiny_cpu",
         "--steps=1", "--set", "train.seq_len=32", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table_rows(stdout):
  return [[c.strip() for c in line.strip("|").split("|")]
          for line in stdout.splitlines() if line.startswith("| tiny_cpu")]


def test_device_sweep_grows_the_batch_and_reports_scaling():
  proc = run_bench("--device_counts=1,2", "--batch_per_device=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = table_rows(proc.stdout)
  assert [r[1] for r in rows] == ["1", "2"], proc.stdout
  assert [r[3] for r in rows] == ["2×32", "4×32"]
  assert rows[0][6] == "1.00×"
  assert float(rows[1][6].rstrip("×")) > 0


def test_device_count_larger_than_host_is_refused():
  proc = run_bench("--device_counts=1,3")
  assert proc.returncode != 0
  assert "--device_counts [3]: this host has 2 devices" in proc.stderr


def test_mesh_that_does_not_fit_a_count_fails_before_any_compile():
  # batch 3 does not divide over 2 data-parallel devices: refused up front, so no row is printed
  proc = run_bench("--device_counts=1,2", "--set", "train.batch_size=3")
  assert proc.returncode != 0
  assert "train.batch_size" in proc.stderr
  assert table_rows(proc.stdout) == []


def test_profile_top_prints_a_kernel_table_per_measurement():
  # on the CPU the trace has no device kernels: the table is printed with its header only
  proc = run_bench("--profile_top=5", devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(table_rows(proc.stdout)) == 1
  assert "### tiny_cpu on 1 devices: device time per step by kernel" in proc.stdout
  assert "| kernel | ms / call | share | launches / call |" in proc.stdout


def test_variants_run_in_one_process_and_are_labelled():
  proc = run_bench("--variant=base:", "--variant=full:model.remat=full;train.batch_size=4",
                   devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = table_rows(proc.stdout)
  assert [r[0] for r in rows] == ["tiny_cpu [base]", "tiny_cpu [full]"], proc.stdout
  assert [r[3] for r in rows] == ["16×32", "4×32"]
  # the compiled step's memory per device: more for the larger batch
  assert 0 < float(rows[1][11]) <= float(rows[0][11]), proc.stdout
  assert proc.stdout.count("matmul peak measured") == 1


def test_bad_variant_fails_before_any_compile():
  proc = run_bench("--variant=ok:", "--variant=bad:model.remat=sometimes", devices=1)
  assert proc.returncode != 0
  assert "model.remat" in proc.stderr
  assert table_rows(proc.stdout) == []
  proc = run_bench("--variant=model.remat=full", devices=1)
  assert proc.returncode != 0 and "LABEL:OVERRIDE" in proc.stderr



def test_higher_peak_table_uses_the_higher_of_two_peaks():
  import types
  sys.path.insert(0, ROOT)
  from experiments import bench_train
  from jaxlm import configs
  cfg = configs.get_preset("tiny_cpu")
  r = types.SimpleNamespace(params=1e6, step_ms=10.0, tokens_per_s=1000.0,
                            model_tflops_per_device=300.0, compile_s=1.0, device_gb=None)
  text = bench_train.higher_peak_table([("tiny_cpu", 1, cfg, r, 1000.0)], 400.0, 600.0, None, 1)
  assert "measured again after the runs: 600 TFLOP/s" in text
  rows = table_rows(text)
  assert len(rows) == 1 and rows[0][8] == "50.0%", text     # 300 / max(400, 600)
  text = bench_train.higher_peak_table([("tiny_cpu", 1, cfg, r, 1000.0)], 500.0, 450.0, None, 1)
  assert table_rows(text)[0][8] == "60.0%"
