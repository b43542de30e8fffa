"""Run sections of the config: train, data and mesh, the root Config, and ConfigError.

Frozen dataclasses only (MeshConfig also resolves its -1 axis against a device count). Import
them through jaxlm.config (the public module), which re-exports every name.
"""
from __future__ import annotations

import dataclasses
import math

from jaxlm.config_model import ModelConfig


class ConfigError(ValueError):
  """A configuration value is unknown, of the wrong type, or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32          # global sequences per optimizer step
  seq_len: int = 256
  grad_accum: int = 1           # micro-batches per step (batch_size % grad_accum == 0)
  lr: float = 3e-3
  min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0        # global-norm clip; 0 = off
  # dtype of AdamW's first moment (optax's mu_dtype): "bfloat16" halves its memory and its
  # share of the update's traffic; the second moment stays float32
  mu_dtype: str = "float32"
  z_loss: float = 0.0           # coefficient of mean(logsumexp(logits)^2)
  # > 1: output head + cross entropy (and their gradients) over this many chunks of the
  # sequence, so a [batch, seq, vocab] f32 logits array is never held (jaxlm/train/chunked_loss)
  loss_chunks: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 16
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  output_dir: str = "runs/default"
  peak_tflops: float = 0.0      # per-device bf16 peak for MFU; 0 = guess from device kind
  max_nonfinite_steps: int = 10 # stop after this many consecutive skipped (NaN/inf) steps


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "shakespeare"   # shakespeare | files
  paths: tuple[str, ...] = ()   # .txt / .jsonl / .array_record files or globs (source=files)
  jsonl_field: str = "text"
  tokenizer: str = "bpe"        # bpe (trained on the corpus, cached) | byte
  tokenizer_path: str = ""      # an existing `tokenizers` JSON instead of training one
  val_fraction: float = 0.05    # fraction of documents held out
  cache_dir: str = ""           # default $JAXLM_CACHE or ~/.cache/jaxlm
  num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 on one axis means 'all remaining devices'."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  @property
  def axis_names(self) -> tuple[str, ...]:
    return ("data", "fsdp", "tensor", "expert")

  def resolve(self, n_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    names = self.axis_names
    for n, s in zip(names, sizes):
      if s == 0 or s < -1:
        raise ConfigError(f"mesh.{n}={s}: must be a positive size or -1")
    if sizes.count(-1) > 1:
      raise ConfigError("mesh: at most one axis may be -1 (fill)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % fixed:
        raise ConfigError(f"mesh: fixed axes product {fixed} does not divide {n_devices} devices")
      sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
      raise ConfigError(
          f"mesh: {dict(zip(names, sizes))} has {math.prod(sizes)} devices, but {n_devices} are present")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "custom"
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
