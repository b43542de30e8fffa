"""Model FLOPs per trained token, per model kind and attention kind (the numerator of MFU).

Matmuls: every weight matrix a token multiplies through once in the forward (2 FLOPs per
weight), counted from the same shapes the layers build (tests check the count against the
param trees): attention projections, the FFN's active params, the output head (the embedding
lookup is free; a tied head still costs its matmul). Attention: QK^T and PV, 2 * 2 * head_dim
FLOPs per head per visible key, with the keys each attention kind actually visits:
  full          seq/2 on average (the usual convention);
  sliding       min(t + 1, window) for query t, averaged over t (seq/2 when the window covers
                the sequence);
  nsa           compressed blocks ending at or before t, the tokens of the top-n selection
                blocks (all of them while t has fewer blocks), and min(t + 1, nsa_window); plus
                the compression MLPs, which run once per nsa_stride tokens;
  symboliclight the local window plus the anchors before it (spike masks do not shrink the
                work the kernels do).
Elementwise work (norms, activations, the LIF and decay recurrences) is not counted.
fwd + bwd = 3 x fwd.
"""
from __future__ import annotations

import numpy as np

from jaxlm.config import ModelConfig


def _ffn_matmul_params(m: ModelConfig) -> int:
  """Params one token multiplies through in a block's FFN: dense SwiGLU, or the top-k routed
  experts (upper bound for BlockFFN's variable k; MoE++ zero/copy experts counted as FFN
  experts) plus shared experts and the router."""
  moe = m.moe
  if moe.kind == "none":
    return 3 * m.d_model * m.d_ff
  expert = 3 * m.d_model * m.resolved_d_expert
  return (moe.top_k + moe.n_shared_experts) * expert + m.d_model * moe.n_routed


def _prior_bottleneck(m: ModelConfig) -> int:
  return m.spiking.prior_bottleneck or m.d_model // 4


def matmul_params_per_token(m: ModelConfig) -> int:
  """Weights one token multiplies through in the forward (blocks and head)."""
  d, hd, h, kv = m.d_model, m.resolved_head_dim, m.n_heads, m.n_kv_heads
  head = d * m.vocab_size
  if m.kind == "symboliclight":
    sp = m.spiking
    mixer = d * hd * h                                   # output projection
    if sp.mixer != "attention":
      mixer += d * hd * h                                # decay path input (w_tcam)
    if sp.mixer != "decay":
      mixer += d * hd * (h + 2 * kv)                     # q, k, v
    if sp.head == "dynamic_prior":
      head += d * _prior_bottleneck(m) + _prior_bottleneck(m) * m.vocab_size
    return m.n_layers * (mixer + 2 * d * m.d_ff) + head
  a = m.attention
  if a.kind == "nsa":
    kv_sets = 1 if a.nsa_shared_kv else 3
    attn = 2 * d * h * hd + kv_sets * 2 * d * kv * hd + 3 * d * h     # q, o, k/v, gates
  else:
    attn = d * hd * (2 * h + 2 * kv)
  return m.n_layers * (attn + _ffn_matmul_params(m)) + head


def keys_per_query(m: ModelConfig, seq_len: int) -> float:
  """Keys one query attends to in one layer, averaged over the positions of a sequence."""
  if seq_len <= 0:
    return 0.0
  t = np.arange(seq_len)
  if m.kind == "symboliclight":
    sp = m.spiking
    if sp.mixer == "decay":
      return 0.0
    visible = np.minimum(t + 1, sp.window) + np.clip(t + 1 - sp.window, 0, sp.n_anchors)
    return float(visible.mean())
  a = m.attention
  if a.kind == "nsa":
    l, stride, ls, n = a.nsa_block_len, a.nsa_stride, a.nsa_select_len, a.nsa_top_n
    compressed = np.maximum((t - (l - 1)) // stride + 1, 0)
    available = t // ls + 1
    selected = np.where(available <= n, t + 1, (n - 1) * ls + t % ls + 1)
    window = np.minimum(t + 1, a.nsa_window)
    return float((compressed + selected + window).mean())
  if a.kind == "sliding" and 0 < a.window < seq_len:
    return float(np.minimum(t + 1, a.window).mean())
  return seq_len / 2


def _nsa_compress_flops_per_token(m: ModelConfig) -> float:
  """Forward FLOPs of one layer's two compression MLPs (keys and values) per token."""
  from jaxlm.layers.nsa import compress_hidden
  a, hd, kv = m.attention, m.resolved_head_dim, m.n_kv_heads
  hid = compress_hidden(m)
  per_block = 2 * kv * (a.nsa_block_len * hd * hid + hid * hd)    # MACs, both MLPs
  return 2 * per_block / a.nsa_stride


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token, fwd + bwd (see the module docstring)."""
  attn = m.n_layers * 2 * 2 * m.n_heads * m.resolved_head_dim * keys_per_query(m, seq_len)
  fwd = 2 * matmul_params_per_token(m) + attn
  if m.kind != "symboliclight" and m.attention.kind == "nsa":
    fwd += m.n_layers * _nsa_compress_flops_per_token(m)
  return 3 * fwd
