"""Block sizes of the LIF kernels, with per-device-kind heuristics.

GPU (pallas_triton): one program owns `block_c` channels of one batch row and walks time in
registers. Forward keeps prefetch_chunks * time_chunk rows of x in flight (a prefetch ring whose
time_chunk steps are unrolled, so more chunks lengthen the ring at the same compile time; with
batch 1 the bytes in flight on the whole GPU are channels * rows * 4. H200, session 15, B1 T8192
C8192 f32 inference forward at the device defaults: 1 chunk 0.239 ms (61% of copy), 2 chunks
0.282, 3 chunks 0.297, spikes identical: more rows in flight lost, so the forward is not limited
by bytes in flight at these tiles) and writes the membrane state every `ckpt_every` steps (a
[batch, ceil(T/ckpt_every), channels] f32 checkpoint, 1/ckpt_every of the spike traffic).
Backward walks chunks of `ckpt_every` steps from the last to the first: it recomputes the
chunk's pre-clip potentials from the checkpoint and x (held in registers), then runs the chunk
backwards; x and the spike cotangent of the next chunk are prefetched while the current one is
processed. `time_chunk` must be a multiple of `ckpt_every`. With `bwd_segment` S > 0 the
backward instead runs one program per S-step time segment (a multiple of ckpt_every), chained
through the incoming membrane gradient (ops/lif/pallas_triton_segments.py): B * T / S * C /
bwd_block_c programs instead of B * C / bwd_block_c, for small batches. With `segment` S > 0
the forward runs one program per S-step segment too, each started from the state a replay of
the previous segment's last `segment_replay` steps from rest reaches, checked and fixed up
until exact (ops/lif/pallas_triton_fwd_segments.py); it unrolls `segment_chunk` steps (not
time_chunk: with thousands of programs in flight a short ring suffices, and its three loops
of 64 unrolled steps took minutes to compile on the H200). H200, session 16, B1 T8192 C8192 f32,
x ~ 1.2 N(0, 1) (a 10% spike rate, the paper's sparsity): serial 0.237 ms (62% of copy);
segments of 1024 with 128 replayed steps 0.223 ms on 32 channels per program, 0.202-0.204 ms
(72-73%) on 64-256 channels per program (wider rows of x per access; the serial kernel cannot
widen at batch 1 without losing programs). It is not the default because its speed depends on
the input: at spike rates of 2-4% the replayed starts are often wrong and the fix-up pass
re-runs whole segments (S 256, W 64, x ~ 0.5 N(0, 1): 0.444 ms). `bwd_replay` W > 0 does the
same for the backward's carry, for a detached hard reset only (other resets keep the chained
or serial backward): bwd_replay_segment-step segments on their own tiles, no hand-off
(ops/lif/pallas_triton_bwd_replay.py). It is the H100/H200 default since session 17; what made
it fast was loading each 16-step chunk's rows one chunk early (bwd_replay_prefetch). H200,
B1 T8192 C8192 f32 fwd+bwd, x ~ 1.2 N(0, 1), one process (copy 3614 GB/s): chain 0.909 ms
(41%); replay S 1024 W 128 without prefetch 0.873 / 1.069 / 0.840 / 1.032 ms on 64 ch x 1 warp
/ 128 x 1 / 128 x 4 / 256 x 2, S 512 W 64 128 x 4 0.803; with prefetch 0.700 (64 x 2) and
0.607 (128 x 4, 61%). Another process (copy 3411 GB/s): chain 0.985, prefetch S 512 W 64
0.648 (61%), S 1024 W 128 0.747, plus the segment forward 0.640; at x ~ 0.5 N(0, 1) (3.5%
spikes) chain 0.982, replay 0.893. Those fix-up passes re-ran whole segments; with
`fixup_merge` both segment kernels' fix-ups stop where the new walk meets the earlier one.
Session 18 (H200): the segment forward's merge walk compiles (S 1024 W 128, 128 ch x 1 warp,
forward only: 0.256 / 0.287 ms at 10% / 3.5% spikes vs 0.221 / 0.360 without it; the serial
default 0.235 / 0.236); the replay backward's, on prefetched rows, segfaulted the Triton
compiler, so lif refuses that combination (without prefetch: untried). Off by default.
Session 18 also moved the replay to 128 channels on 1 warp (4 a thread) with 8-step chunks
(for_device has the numbers).
Mosaic GPU forward (pallas_mosaic_gpu): one CTA per (batch row, mgpu_block_c channels);
tiles of mgpu_time_chunk steps x block_c stream through shared memory, mgpu_stages in flight.
TPU (pallas_tpu): blocks of (tpu_block_t time steps, tpu_block_c channels on lanes); the
checkpoint is taken at every time block.
"""
from __future__ import annotations

import dataclasses

MAX_SEGMENT = 256


@dataclasses.dataclass(frozen=True)
class LifConfig:
  block_c: int = 64
  time_chunk: int = 32
  num_warps: int = 2
  num_stages: int = 1
  prefetch_chunks: int = 1  # forward: chunks of time_chunk rows of x in flight
  segment: int = 0          # >0: forward in parallel time segments of this many steps
  segment_replay: int = 128  # steps of the previous segment replayed to guess a segment's start
  segment_chunk: int = 16   # segment forward: steps unrolled per loop iteration (compile time)
  ckpt_every: int = 16
  bwd_block_c: int = 64
  bwd_num_warps: int = 2
  bwd_segment: int = 0      # >0: backward in parallel time segments of this many steps
  # >0: for hard reset with detach_reset, the backward runs bwd_replay_segment-step segments,
  # each starting from the carry a replay of this many steps of the segment after it reaches,
  # instead of the serial / chained kernels above (which other resets keep using); its own
  # tiles, and whether each chunk's rows are loaded one chunk early (prefetch)
  bwd_replay: int = 0
  bwd_replay_segment: int = 512
  bwd_replay_block_c: int = 128
  bwd_replay_num_warps: int = 4
  bwd_replay_prefetch: bool = True
  # the segment kernels' fix-up walks (segment forward, replay backward) stop where they meet
  # the walk before them instead of re-running whole segments (interpret-tested; not yet
  # compiled on the GPU, so off until it is)
  fixup_merge: bool = False
  lookback: bool = False    # decoupled look-back instead of the chain; interpret mode only
  tpu_block_c: int = 512
  tpu_block_t: int = 64
  mgpu_block_c: int = 128
  mgpu_time_chunk: int = 32
  mgpu_stages: int = 0      # 0: as many as fit in shared memory (ops/_mosaic_gpu.fit_stages)

  def __post_init__(self):
    for f in ("block_c", "bwd_block_c", "bwd_replay_block_c"):
      v = getattr(self, f)
      if v < 1 or v & (v - 1):
        raise ValueError(f"LifConfig.{f} must be a power of 2, got {v}")
    if self.prefetch_chunks < 1:
      raise ValueError(f"LifConfig.prefetch_chunks must be >= 1, got {self.prefetch_chunks}")
    if self.ckpt_every < 1 or self.time_chunk < 1 or self.time_chunk % self.ckpt_every:
      raise ValueError(f"LifConfig.time_chunk ({self.time_chunk}) must be a positive multiple "
                       f"of ckpt_every ({self.ckpt_every})")
    if self.segment and (self.segment_chunk < 1 or self.segment_chunk % self.ckpt_every):
      raise ValueError(f"LifConfig.segment_chunk ({self.segment_chunk}) must be a positive "
                       f"multiple of ckpt_every ({self.ckpt_every})")
    for f in ("segment", "segment_replay") if self.segment else ("segment",):
      v = getattr(self, f)
      if v < 0 or v % self.segment_chunk:
        raise ValueError(f"LifConfig.{f} ({v}) must be 0 or a positive multiple of "
                         f"segment_chunk ({self.segment_chunk})")
    if self.segment and self.segment_replay > self.segment:
      raise ValueError(f"LifConfig.segment_replay ({self.segment_replay}) must be <= segment "
                       f"({self.segment}): it replays steps of the previous segment")
    if self.bwd_segment < 0 or self.bwd_segment % self.ckpt_every:
      raise ValueError(f"LifConfig.bwd_segment ({self.bwd_segment}) must be 0 or a positive "
                       f"multiple of ckpt_every ({self.ckpt_every})")
    if self.bwd_replay < 0 or self.bwd_replay % self.ckpt_every:
      raise ValueError(f"LifConfig.bwd_replay ({self.bwd_replay}) must be 0 or a positive "
                       f"multiple of ckpt_every ({self.ckpt_every})")
    if self.bwd_replay and (self.bwd_replay_segment < 1
                            or self.bwd_replay_segment % self.ckpt_every):
      raise ValueError(f"LifConfig.bwd_replay_segment ({self.bwd_replay_segment}) must be a "
                       f"positive multiple of ckpt_every ({self.ckpt_every})")
    if self.bwd_replay > self.bwd_replay_segment:
      raise ValueError(f"LifConfig.bwd_replay ({self.bwd_replay}) must be <= "
                       f"bwd_replay_segment ({self.bwd_replay_segment}): it replays steps of "
                       "the next segment")
    if self.bwd_segment > MAX_SEGMENT:
      raise ValueError(f"LifConfig.bwd_segment ({self.bwd_segment}) must be <= {MAX_SEGMENT}: "
                       "a segment's steps are unrolled and held in registers (the replay "
                       "backward's bwd_replay_segment is walked in chunks and may be longer)")
    if self.tpu_block_c % 128 or self.tpu_block_t % 8:
      raise ValueError("LifConfig: tpu_block_c must be a multiple of 128 and tpu_block_t of 8")

  @staticmethod
  def for_device(device_kind: str | None = None) -> "LifConfig":
    kind = (device_kind or "").lower()
    if "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind:
      # experiments/tune_ops.py on an H100, B1 T8192 C8192 f32 (copy 2.68 TB/s): forward
      # 0.393 ms (51% of copy) with 32 channels on 1 warp vs 0.498 ms (40%) on 2 warps;
      # forward+backward 1.242 ms with the backward on 32 channels / 1 warp vs 1.284 ms.
      # Backward in 32-step segments (H200, session 11, same run): fwd+bwd 0.916 ms vs
      # 0.984 ms serial; the serial hand-off between 256 segments limits it. Under a detached
      # hard reset (SymbolicLight's), the replay backward on 512-step segments replaying 64
      # steps, 128 channels on 4 warps, rows prefetched one chunk early (H200, session 17,
      # fwd+bwd, same process): 0.648 ms (61% of copy) vs the chain's 0.985 at a 10% spike
      # rate, 0.893 vs 0.982 at 3.5% (where fix-ups re-run whole segments; fixup_merge stops
      # them where the walks merge, untimed). Session 18: 4 channels a thread (128 on 1 warp)
      # with 8-step chunks (ckpt_every 8, so the prefetched rows fit in registers), three
      # processes: 0.648 / 0.669 ms vs 0.689 / 0.684 at 10%, 0.880 / 0.896 vs 0.949 / 0.957 at
      # 3.5%; SymbolicLight's B32 T1024 C4096 bf16: 0.600 ms (65% of copy) vs 0.663 (59%),
      # the chain 0.812 (48%). 128 on 1 warp with 16-step chunks: 0.799 (slower).
      return LifConfig(block_c=32, time_chunk=64, num_warps=1, ckpt_every=8, bwd_block_c=32,
                       bwd_num_warps=1, bwd_segment=32, bwd_replay=64, bwd_replay_block_c=128,
                       bwd_replay_num_warps=1)
    if "tpu" in kind:
      return LifConfig(tpu_block_c=512, tpu_block_t=64)
    return LifConfig()
