"""Named shape sets of the NSA op: `ci` (small, CPU) and `bench` (GPU benchmark)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAShape:
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  decode_batch: int = 8
  # 0: i.i.d. queries (neighbours pick unrelated blocks: the worst case for query tiles); w > 0:
  # each query a w-token moving average of noise, so neighbours share (w-1)/w of it and pick
  # mostly the same blocks, as the paper reports for trained models (the bench prints the
  # measured overlap)
  q_smooth: int = 0

  @property
  def name(self) -> str:
    smooth = f" q smoothed over {self.q_smooth}" if self.q_smooth else ""
    return f"B{self.batch} T{self.seq} H{self.heads}/KV{self.kv_heads} D{self.head_dim}{smooth}"


SHAPES = {
    "ci": (NSAShape(1, 256, 4, 1, 64, decode_batch=2),),
    "bench": tuple(NSAShape(1, t, 64, 4, 128) for t in (8192, 16384, 32768, 65536)),
    # the two ends of the sweep, longest first (short device sessions)
    # 8k and 16k only: the per-branch breakdown in a short device call
    "bench_short": tuple(NSAShape(1, t, 64, 4, 128) for t in (8192, 16384)),
    "bench_ends": tuple(NSAShape(1, t, 64, 4, 128) for t in (65536, 8192)),
    # neighbouring queries that share most of their blocks (see NSAShape.q_smooth)
    "bench_smooth": tuple(NSAShape(1, t, 64, 4, 128, q_smooth=64) for t in (65536, 16384)),
    # decode only (experiments/bench/nsa.py runs just the decode rows for sets named *_decode):
    # batch 8, caches of 16k and 64k tokens
    "bench_decode": tuple(NSAShape(1, t, 64, 4, 128) for t in (16384, 65536)),
    "ci_decode": (NSAShape(1, 256, 4, 1, 64, decode_batch=2),),
}
