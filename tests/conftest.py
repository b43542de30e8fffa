"""Test-wide setup: 8 simulated CPU devices and hardware-dependent skips."""
import os

# No jax import behind it; importing jaxlm also readies libtpu / the CUDA plugin for a host
# without TPU chips / GPUs (the tpu_aot and gpu_aot tests).
from jaxlm import host_env

# Must happen before jax initialises its backends: multi-device code is tested
# on CPU over 8 host devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# The CPU suite is compile-bound (hundreds of small programs, tiny tensors): skipping LLVM's
# optimisation passes cut an NSA interpret test from 32 to 22 s on 2 cores. Not on a GPU host:
# there the flag also reaches the GPU code generator, and the GPU tests should check the
# optimised code that runs (and their large references are run-time-, not compile-bound).
# Set the flag yourself to choose.
if (not host_env.nvidia_gpu_attached()
    and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import importlib.util

import jax
import pytest


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def _ci_slow_ids() -> set[str]:
  """Node ids listed in tests/ci_slow.txt (comments after '#')."""
  path = os.path.join(os.path.dirname(__file__), "ci_slow.txt")
  with open(path) as f:
    return {line.split("#")[0].strip() for line in f} - {""}


@pytest.hookimpl(tryfirst=True)    # before the -m "not slow" deselection sees the marks
def pytest_collection_modifyitems(config, items):
  slow_ids = _ci_slow_ids()
  for item in items:
    if item.nodeid in slow_ids:
      item.add_marker(pytest.mark.slow)
  has_gpu = _has_gpu()
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  no_gpu = pytest.mark.skip(reason="no GPU present (run on the device)")
  no_libtpu = pytest.mark.skip(reason="libtpu not installed (pip install -e .[tpu])")
  has_cuda_plugin = host_env.has_cuda_plugin()
  no_cuda_plugin = pytest.mark.skip(
      reason="CUDA PJRT plugin not installed (pip install -e .[gpu]; no GPU needed)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(no_gpu)
    if "tpu_aot" in item.keywords and not has_libtpu:
      item.add_marker(no_libtpu)
    if "gpu_aot" in item.keywords and not has_cuda_plugin:
      item.add_marker(no_cuda_plugin)


def pytest_runtest_logreport(report):
  """With JAXLM_FAILURE_LOG=<path>, append each failure's traceback to that file as it happens
  (device runs end at a time limit, often before pytest prints its summary)."""
  path = os.environ.get("JAXLM_FAILURE_LOG")
  if path and report.failed:
    with open(path, "a") as f:
      f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
