"""Named shape sets of the gmm op: `ci` (small, CPU tests) and `bench` (H100 benchmark).

Each entry: (name, tokens m, d_model k, d_ff n, groups e, routing) with routing one of
"balanced" (m / e rows each), "imbalanced" (Zipf-like sizes, some groups empty) and
"random" (multinomial).
"""
from __future__ import annotations

import numpy as np

CI = (
    ("ci_small", 64, 32, 48, 4, "random"),
    ("ci_odd", 37, 40, 24, 5, "imbalanced"),
)

BENCH = (
    ("moe_e64_balanced", 32768, 2048, 1408, 64, "balanced"),
    ("moe_e64_imbalanced", 32768, 2048, 1408, 64, "imbalanced"),
    ("moe_e8_balanced", 16384, 2048, 5632, 8, "balanced"),
)

# unipool_469m's pool at 32 x 1024 tokens a layer (top-1 into 192 experts of d 1024, f 4096):
# the gate / up products and the down product, ~171 rows a group
UNIPOOL = (
    ("unipool_469m_up", 32768, 1024, 4096, 192, "random"),
    ("unipool_469m_down", 32768, 4096, 1024, 192, "random"),
)

SETS = {"ci": CI, "bench": BENCH, "unipool": UNIPOOL}


def group_sizes_for(m: int, e: int, routing: str, seed: int = 0) -> np.ndarray:
  """Group sizes summing to m."""
  rng = np.random.default_rng(seed)
  if routing == "balanced":
    sizes = np.full(e, m // e, np.int64)
    sizes[: m - sizes.sum()] += 1
  elif routing == "imbalanced":
    p = 1.0 / np.arange(1, e + 1) ** 1.2
    p[e // 4 :: 7] = 0.0  # a few empty experts
    p = rng.permutation(p / p.sum())
    sizes = rng.multinomial(m, p)
  elif routing == "random":
    sizes = rng.multinomial(m, np.full(e, 1.0 / e))
  else:
    raise ValueError(f"unknown routing {routing!r}")
  return sizes.astype(np.int32)
