"""Shared tiny configs and text files for the jaxlm spine tests (CPU, seconds per test)."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import AttentionConfig, Config, DataConfig, MeshConfig, ModelConfig, TrainConfig

BYTE_VOCAB = 260  # byte tokenizer: 256 bytes + eos, rounded up


def tiny_model(**kw) -> ModelConfig:
  """2 layers, d_model 32, GQA 4/2 heads, f32: compiles in a second or two on CPU."""
  attention = kw.pop("attention", None)
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
              max_seq_len=32, dtype="float32", param_dtype="float32", scan_layers=True)
  base.update(kw)
  if attention is not None:
    base["attention"] = attention if isinstance(attention, AttentionConfig) else AttentionConfig(**attention)
  return ModelConfig(**base)


def random_params(fm, seed: int = 0, std: float = 0.1) -> dict:
  """Random params in `fm`'s layout, made with numpy: no XLA compile (fm.init compiles one
  truncated-normal per parameter shape, seconds on a busy CPU). Norm scales are 1 + noise."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    name = jax.tree_util.keystr(path)
    value = rng.normal(0.0, std, s.shape)
    if name.endswith("['scale']"):
      value = 1.0 + value
    return jnp.asarray(value.astype(s.dtype))

  return jax.tree_util.tree_map_with_path(one, fm.param_shapes)


def write_text_docs(directory, n_docs: int = 6, n_words: int = 400, seed: int = 0) -> list[str]:
  """A few small English-like .txt documents (one document per file)."""
  rng = np.random.default_rng(seed)
  words = ["the", "king", "and", "queen", "of", "a", "small", "land", "walked", "to", "sea",
           "where", "they", "saw", "ships", "sail", "home", "at", "night", "with", "light"]
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(n_docs):
    text = " ".join(str(w) for w in rng.choice(words, size=n_words))
    p = os.path.join(str(directory), f"doc{i:02d}.txt")
    with open(p, "w", encoding="utf-8") as f:
      f.write(f"Document {i}. {text}.\n")
    paths.append(p)
  return paths


def tiny_run_config(tmp_path, paths, **sections) -> Config:
  """A full Config training a tiny byte-level model on local files; outputs under tmp_path.

  sections: model=dict(...), train=dict(...), data=dict(...), mesh=dict(...) field overrides.
  """
  model = tiny_model(vocab_size=BYTE_VOCAB, **sections.get("model", {}))
  train = dict(steps=12, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, log_every=1,
               eval_every=1000, eval_batches=2, checkpoint_every=4, keep_checkpoints=5,
               async_checkpoint=False, output_dir=str(tmp_path / "run"))
  train.update(sections.get("train", {}))
  data = dict(source="files", paths=tuple(paths), tokenizer="byte", val_fraction=0.2,
              cache_dir=str(tmp_path / "cache"))
  data.update(sections.get("data", {}))
  mesh = dict(data=1)
  mesh.update(sections.get("mesh", {}))
  return Config(name="test_tiny", model=model, train=TrainConfig(**train), data=DataConfig(**data),
                mesh=MeshConfig(**mesh))


@pytest.fixture(scope="session")
def text_paths(tmp_path_factory):
  return write_text_docs(tmp_path_factory.mktemp("text"))


def replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)
