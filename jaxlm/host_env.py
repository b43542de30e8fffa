"""Process environment that must be set before jax initialises its backends."""
from __future__ import annotations

import glob
import importlib.util
import os


def tpu_chips_attached() -> bool:
  """A TPU chip on this host's PCI bus (Google's vendor id; what jax itself checks)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":
          return True
    except OSError:
      pass
  return False


def libtpu_placeholders() -> None:
  """Placeholders for the TPU-VM metadata libtpu looks for, so it does not print errors on a host
  without TPU chips; only unset variables are set. libtpu takes /tmp/libtpu_lockfile per process:
  compile-only clients need not be exclusive (else a second process, e.g. a pytest-xdist worker,
  fails with "ABORTED: ... lockfile")."""
  for key, value in (("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


def quiet_libtpu_without_chips() -> None:
  """With libtpu installed (the [tpu] extra, for compiling TPU programs ahead of time) on a
  host without TPU chips, jax still loads libtpu while looking for backends, then runs on
  CPU/GPU, and libtpu prints errors about missing TPU-VM metadata: set the placeholders. Nothing
  on a TPU host; no effect once jax has initialised its backends."""
  if importlib.util.find_spec("libtpu") is not None and not tpu_chips_attached():
    libtpu_placeholders()


def has_cuda_plugin() -> bool:
  """jax's CUDA PJRT plugin (the [gpu] extra) is installed, whether or not a GPU is present."""
  for v in (13, 12):
    try:
      if importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None:
        return True
    except ModuleNotFoundError:  # no jax_plugins namespace at all
      return False
  return False


def nvidia_gpu_attached() -> bool:
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def cuda_plugin_without_gpu() -> None:
  """With the CUDA plugin installed (the [gpu] extra, to compile GPU programs ahead of time) on
  a host without an NVIDIA GPU, the plugin's check of the CUDA libraries against the driver
  fails (there is no driver) and jax drops the plugin, so no GPU topology can be described.
  Skip that check here; nothing on a GPU host. Must run before jax initialises its backends."""
  if not nvidia_gpu_attached() and has_cuda_plugin():
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
