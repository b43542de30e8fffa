"""Peak FLOP/s per device kind (the denominator of MFU; the numerator is
jaxlm/train/model_flops.py) and metric sinks (TensorBoard events, progress bar)."""
from __future__ import annotations

import os


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
