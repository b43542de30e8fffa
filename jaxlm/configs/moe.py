"""MoE presets: UniPool (arXiv 2605.06665) and its vanilla-MoE twins, plus CPU-sized ones.

Shapes from the paper (layers / hidden): 182M 12/768, 469M 24/1024, 650M 36/1024, 830M 48/1024,
978M 24/1536; GQA with 4 kv heads (head_dim 64), RMSNorm, RoPE base 1e6, untied embeddings,
init std 0.01, seq 1024; every expert a SwiGLU of width 4 * d_model.
  vanilla_moe_*: 8 experts per layer, top-1 softmax router (gate = probability, Switch style,
                 not renormalised), per-layer balance loss 1e-2.
  unipool_*:     one pool of M = 8 * L experts shared by all layers, NormRouter top-1, pool-level
                 balance loss 1e-2 at 182M and 2e-2 above, no per-layer loss; the pool's
                 gradient deferred to after the last layer (model.moe.pool_grad).
Training: 60k steps x 512 sequences, AdamW lr 5e-4 cosine to 5e-5, 1% warmup, clip 1.0, bf16.
The paper trains on the Pile; the vocabulary size is not given there: 50304 (GPT-NeoX's, padded)
is assumed. Point data.source=files at local Pile shards for a faithful run.
"""
from jaxlm.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig

# name -> (n_layers, d_model)
SIZES = {"182m": (12, 768), "469m": (24, 1024), "650m": (36, 1024), "830m": (48, 1024),
         "978m": (24, 1536)}


def _model(n_layers: int, d: int, moe: MoEConfig) -> ModelConfig:
  return ModelConfig(vocab_size=50304, d_model=d, n_layers=n_layers, n_heads=d // 64,
                     n_kv_heads=4, d_ff=4 * d, max_seq_len=1024, rope_base=1e6,
                     tie_embeddings=False, init_std=0.01, dtype="bfloat16", remat="dots",
                     moe=moe)


def _train(name: str) -> TrainConfig:
  return TrainConfig(steps=60000, batch_size=512, seq_len=1024, lr=5e-4, min_lr_ratio=0.1,
                     warmup_steps=600, grad_clip=1.0, checkpoint_every=1000, eval_every=1000,
                     output_dir=f"runs/{name}")


def unipool(size: str) -> Config:
  n_layers, d = SIZES[size]
  # pool_grad deferred: H200, unipool_469m, 16 x 1024 a step, session 19: 414 ms against 562
  # per layer (both before the pool was cast once a step); it holds every layer's expert rows,
  # so per_layer fits larger batches (64 x 1024: per_layer 102 GB, deferred out of the H200's
  # memory)
  moe = MoEConfig(kind="unipool", n_experts=8 * n_layers, top_k=1, router="norm_router",
                  pool_balance_loss=1e-2 if size == "182m" else 2e-2, pool_grad="deferred")
  return Config(name=f"unipool_{size}", model=_model(n_layers, d, moe),
                train=_train(f"unipool_{size}"))


def vanilla(size: str) -> Config:
  n_layers, d = SIZES[size]
  moe = MoEConfig(kind="vanilla", n_experts=8, top_k=1, router="softmax_topk",
                  renormalize=False, balance_loss=1e-2)
  return Config(name=f"vanilla_moe_{size}", model=_model(n_layers, d, moe),
                train=_train(f"vanilla_moe_{size}"))


def _tiny(name: str, moe: MoEConfig) -> Config:
  # Trains on CPU in minutes; f32 compute because bf16 is emulated on CPU.
  return Config(
      name=name,
      model=ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=512, max_seq_len=512, rope_base=1e6, init_std=0.02,
                        dtype="float32", moe=moe),
      train=TrainConfig(steps=500, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50,
                        log_every=25, eval_every=100, eval_batches=8, checkpoint_every=100,
                        output_dir=f"runs/{name}"),
      data=DataConfig())


TINY_VANILLA_MOE_CPU = _tiny("tiny_vanilla_moe_cpu", MoEConfig(
    kind="vanilla", n_experts=4, top_k=1, router="softmax_topk", renormalize=False,
    balance_loss=1e-2))
TINY_UNIPOOL_CPU = _tiny("tiny_unipool_cpu", MoEConfig(
    kind="unipool", n_experts=16, top_k=1, router="norm_router", pool_balance_loss=1e-2))

PRESETS = {c.name: c for c in (
    [unipool(s) for s in SIZES] + [vanilla(s) for s in SIZES]
    + [TINY_VANILLA_MOE_CPU, TINY_UNIPOOL_CPU])}
