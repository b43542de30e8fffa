"""experiments/aot_compile.py's --roofline: a per-kernel estimate of each compiled GPU program,
refused (before any compile) for a TPU topology."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "experiments", "aot_compile.py")


def _run(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="")     # one host device: the script needs no more
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_roofline_on_a_tpu_topology_is_refused_before_compiling():
  proc = _run("--topology=v5e:2x2", "--config=tiny_cpu", "--programs=train", "--roofline",
              timeout=120)
  assert proc.returncode != 0
  assert "--roofline prices XLA GPU programs; 'v5e:2x2' is not a GPU topology" in proc.stderr
  assert "train_step |" not in proc.stdout      # nothing was compiled


@pytest.mark.gpu_aot
def test_roofline_prints_the_estimate_of_the_compiled_h100_step():
  proc = _run("--topology=h100", "--config=tiny_cpu", "--programs=train", "--roofline",
              "--roofline_top=5", "--set", "model.n_layers=2", "--set", "train.batch_size=8")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "train_step roofline (NVIDIA H100 80GB HBM3, 2700 GB/s, 688 TFLOP/s" in out
  table = out.split("train_step roofline", 1)[1]
  assert "| kind | ms | launches | GB | TFLOP |" in table
  assert "estimate " in table
  assert "triton_gemm" in table or "cc:__cublas$gemm" in table    # the model's matmuls
