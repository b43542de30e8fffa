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
