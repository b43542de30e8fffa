"""Native Sparse Attention presets (attention.kind=nsa; jaxlm/layers/nsa.py over ops.nsa).

tiny_nsa_cpu: tiny_cpu (vocab 2048, d 256, 4 layers, 4/2 heads, SwiGLU 768, seq 128) with NSA
  blocks scaled down so a 128-token sequence has several of each: compression l=16 d=8
  (15 compressed keys at t=128), selection l'=16 with top n=4 of 8 blocks (first + 2 local
  forced), window 32. A query at t=127 reads at most 15 + 64 + 32 of its 128 keys.
nsa_1b: the dense_1b shape (18 layers, d 2048, 16 query heads of 128, SwiGLU 5632, seq 4096,
  RoPE base 5e5) with the paper's NSA structure: l=32, d=16, l'=64, n=16 (first + 2 local
  forced), w=512, a separate k/v projection per branch, compression MLP 4096 -> 256 -> 128 per
  layer for keys and for values, and the paper's GQA group of 16 query heads per kv head (one
  kv head here; the paper's 27B MoE has 64 heads in 4 groups, d_qk 192, d_v 128). NSA's
  kernels load one group's heads together against the group's selected blocks, so their work
  per kv head is the same whatever the group size, and smaller groups multiply it. Measured
  train step, 4x4096, one H200 (session 6, before the bf16 head backward): kv heads 8 (the
  dense_1b grouping) 937 ms / 15.5% MFU, 4: 578 ms / 24.6%, 2: 401 ms / 36.5%, 1: 314 ms /
  42.6%. ~0.98B parameters.
"""
import dataclasses

from jaxlm.config import AttentionConfig, Config
from jaxlm.configs.dense import DENSE_1B, TINY_CPU

TINY_NSA_ATTENTION = AttentionConfig(kind="nsa", nsa_block_len=16, nsa_stride=8,
                                     nsa_select_len=16, nsa_top_n=4, nsa_window=32)

TINY_NSA_CPU = dataclasses.replace(
    TINY_CPU, name="tiny_nsa_cpu",
    model=dataclasses.replace(TINY_CPU.model, attention=TINY_NSA_ATTENTION),
    train=dataclasses.replace(TINY_CPU.train, output_dir="runs/tiny_nsa_cpu"))

NSA_1B = dataclasses.replace(
    DENSE_1B, name="nsa_1b",
    # scanned layers: the unrolled dense_1b step is not measured with NSA blocks
    model=dataclasses.replace(DENSE_1B.model, n_kv_heads=1, scan_layers=True,
                              attention=AttentionConfig(
                                  kind="nsa", nsa_block_len=32, nsa_stride=16,
                                  nsa_select_len=64, nsa_top_n=16, nsa_window=512)),
    train=dataclasses.replace(DENSE_1B.train, output_dir="runs/nsa_1b"))

PRESETS: dict[str, Config] = {c.name: c for c in (TINY_NSA_CPU, NSA_1B)}
