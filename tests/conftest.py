"""Test-wide setup: 8 simulated CPU devices and hardware-dependent skips."""
import os

# Must happen before jax initialises its backends: multi-device code is tested
# on CPU over 8 host devices.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import glob
import importlib.util


def _tpu_chips_attached() -> bool:
  """A TPU chip on this host's PCI bus (Google's vendor id; what jax itself checks)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == "0x1ae0":
        return True
    except OSError:
      pass
  return False


# libtpu installed (the [tpu] extra, for the tpu_aot tests) on a host without TPU chips: jax
# still loads it while looking for backends (then runs on CPU) and libtpu warns loudly about
# missing TPU-VM metadata; placeholders keep it quiet, and several processes (xdist workers)
# may load it as compile-only clients.
if importlib.util.find_spec("libtpu") is not None and not _tpu_chips_attached():
  for _k, _v in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                 ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(_k, _v)

import jax
import pytest


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  has_gpu = _has_gpu()
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  no_gpu = pytest.mark.skip(reason="no GPU present (run on the device)")
  no_libtpu = pytest.mark.skip(reason="libtpu not installed (pip install -e .[tpu])")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(no_gpu)
    if "tpu_aot" in item.keywords and not has_libtpu:
      item.add_marker(no_libtpu)
