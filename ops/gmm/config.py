"""Block sizes of the gmm / tgmm kernels, with per-device-kind heuristics."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GmmBlockConfig:
  """Tiles and launch parameters.

  gmm (also the d lhs product, with the roles of k and n swapped):
    block_m rows of lhs per tile, block_n output columns, block_k contraction chunk.
  tgmm (d rhs): one program per (group, k tile, n tile) output block of
    tgmm_block_k x tgmm_block_n, looping over that group's rows tgmm_block_m at a time.
  num_warps / num_stages are Triton launch parameters (ignored by the TPU kernel).
  mgpu_*: the Mosaic GPU gmm (Hopper): block_m rows (a multiple of 64: one warpgroup's
    wgmma rows), block_n columns (whole 128-byte rows, up to 256: 64/128/192/256 for bf16;
    n must be a multiple of it), block_k contraction chunk (128 bytes: 64 for bf16), stages
    shared-memory slots of the TMA pipeline (0 = as many as fit), compute_wgs: 1 = one
    warpgroup issues both the TMA loads and the wgmma; 2 = two compute warpgroups share a
    CTA tile of block_m x (2 * block_n) fed by a third warpgroup that only issues loads.
    block_n is halved (down to 128-byte rows) while compute_wgs x block_n does not divide n.
    split_m: 1 = the compute warpgroups split the CTA tile's rows instead, a tile of
    (compute_wgs x block_m) x block_n (each warpgroup a block_m x block_n wgmma over the same
    rhs tile: more work per rhs byte, more rows past a group's end). chain_tiles: 1 = with
    compute_wgs 2, a CTA's tiles run as one chained pipeline (the loads of the next tile
    overlap the end and the store of the current one; the depth becomes the largest one
    <= stages dividing k / block_k, and without one >= 2 the tiles run unchained).
  mgpu_tgmm_*: the Mosaic GPU tgmm: block_k x block_n output tiles (wgmma rows / columns),
    block_m rows of a group per contraction step (128 bytes: 64 for bf16), stages slots.
  """
  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  tgmm_block_m: int = 64
  tgmm_block_k: int = 128
  tgmm_block_n: int = 128
  tgmm_num_warps: int = 8
  tgmm_num_stages: int = 3
  mgpu_block_m: int = 128
  mgpu_block_n: int = 128
  mgpu_block_k: int = 64
  mgpu_stages: int = 4
  mgpu_compute_wgs: int = 1
  mgpu_split_m: int = 0
  mgpu_chain_tiles: int = 0
  mgpu_tgmm_block_m: int = 64
  mgpu_tgmm_block_k: int = 128
  mgpu_tgmm_block_n: int = 128
  mgpu_tgmm_stages: int = 4

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      zero_ok = ("mgpu_stages", "mgpu_split_m", "mgpu_chain_tiles")
      if not isinstance(v, int) or v < (0 if f.name in zero_ok else 1):
        raise ValueError(f"GmmBlockConfig.{f.name} must be a positive int ({', '.join(zero_ok)} "
                         f"may be 0), got {v!r}")

  def replace(self, **kw) -> "GmmBlockConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def for_device(cls, device_kind: str = "", platform: str = "gpu") -> "GmmBlockConfig":
    """Heuristic defaults per device kind (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v5 lite')."""
    kind = device_kind.lower()
    if platform == "tpu" or "tpu" in kind:
      # Mosaic: last two block dims multiples of (8, 128); MXU-sized tiles.
      return cls(block_m=512, block_n=512, block_k=512, tgmm_block_m=512,
                 tgmm_block_k=512, tgmm_block_n=512)
    if "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind:
      # Sweeps on H100 (m=32768 k=2048 n=1408 e=64, bf16, experiments/bench/gmm.py --sweep):
      # gmm 128x128x64 w4 s4 263 TFLOP/s fwd / 305 for d lhs (the most even of the tiles
      # tried); tgmm 32x128x128 w4 s4 319-342 TFLOP/s.
      # Mosaic GPU gmm (H200, back-to-back calls, jax 0.11.2; einsum of the same FLOPs
      # 0.252 / 0.469 ms): e64 n=1408 fwd 128 x (2 x 64) on 5-6 stages 0.339-0.344 ms (one
      # warpgroup 128 x 128: 0.338-0.359); d lhs (n=2048) 128 x (2 x 128) on 3 stages
      # 0.352 ms; e8 n=5632 fwd 0.563 ms / d lhs 0.520 ms with 128 x (2 x 128) on 3 stages
      # (2 x 64: 0.594-0.616). 64-row tiles: 0.48-0.53 ms at e64. stages=0 picks 6 and 3.
      return cls(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4,
                 tgmm_block_m=32, tgmm_block_k=128, tgmm_block_n=128, tgmm_num_warps=4,
                 tgmm_num_stages=4, mgpu_block_m=128, mgpu_block_n=128, mgpu_block_k=64,
                 mgpu_stages=0, mgpu_compute_wgs=2)
    if "a100" in kind or "a10" in kind or "l4" in kind:
      return cls(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=3,
                 tgmm_block_m=32, tgmm_block_k=128, tgmm_block_n=128, tgmm_num_warps=4,
                 tgmm_num_stages=3)
    return cls()
