"""tokamax (Google's Pallas kernel library) as an optional benchmark baseline.

Only its grouped matmul is used, as the `tokamax gmm` row of experiments/bench/gmm.py. tokamax is
not a dependency: install it (or carry it as a wheel to the device) to get that row.
"""
from __future__ import annotations

import sys
import types
from typing import Callable


def ragged_dot() -> Callable | None:
  """tokamax.ragged_dot(lhs, rhs, group_sizes), or None when tokamax does not import."""
  try:
    import xprof.cli.tools  # noqa: F401
  except ImportError:
    # tokamax imports xprof's kernel-stats tool at import time for its own benchmarking
    # helpers only; ragged_dot does not use it, so an empty stand-in lets the import succeed.
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
  try:
    import tokamax
    return tokamax.ragged_dot
  except Exception as e:  # any import failure just drops the baseline
    print(f"tokamax unavailable: {type(e).__name__}: {e}", flush=True)
    return None
