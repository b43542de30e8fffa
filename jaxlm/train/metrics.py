"""FLOP accounting (MFU), throughput and metric sinks (TensorBoard events, progress bar)."""
from __future__ import annotations

import os

from jaxlm.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip by device kind (datasheet); used when train.peak_tflops=0.
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  if override:
    return override
  for key, value in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return value
  return None


def _ffn_matmul_params(m: ModelConfig) -> int:
  """Params one token multiplies through in a block's FFN: dense SwiGLU, or the top-k routed
  experts (upper bound for BlockFFN's variable k; MoE++ zero/copy experts counted as FFN
  experts) plus shared experts and the router."""
  moe = m.moe
  if moe.kind == "none":
    return 3 * m.d_model * m.d_ff
  expert = 3 * m.d_model * m.resolved_d_expert
  return (moe.top_k + moe.n_shared_experts) * expert + m.d_model * moe.n_routed


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (fwd + bwd = 3× fwd), counting matmuls and causal attention.

  Matmul params: attention projections, the FFN's active params, output head (the embedding
  lookup is free). Causal attention: QKᵀ and PV over on average seq/2 keys. Transformer
  models only; other kinds (symboliclight) count their projections the same way as an
  approximation.
  """
  d, hd, h, kv = m.d_model, m.resolved_head_dim, m.n_heads, m.n_kv_heads
  per_layer = d * hd * (2 * h + 2 * kv) + _ffn_matmul_params(m)
  matmul_params = m.n_layers * per_layer + d * m.vocab_size
  attn = m.n_layers * 2 * 2 * h * hd * (seq_len / 2)
  return 3 * (2 * matmul_params + attn)


class MetricWriter:
  """TensorBoard event files (process 0 only); scalars are floats."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._w = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(logdir, exist_ok=True)
      self._w = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict, prefix: str = "") -> None:
    if self._w is None:
      return
    for k, v in values.items():
      self._w.add_scalar(f"{prefix}{k}", float(v), step)
    self._w.flush()

  def text(self, step: int, tag: str, value: str) -> None:
    if self._w is not None:
      self._w.add_text(tag, value, step)
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
