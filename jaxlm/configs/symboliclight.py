"""SymbolicLight V1 presets (arXiv 2605.21333; model: jaxlm/models/symboliclight.py).

symboliclight_194m: vocab 48000, d 768, 12 layers, 12 heads x 64, spiking FFN 4096, local
window 256 with 4 anchor tokens, RoPE base 1e4, LayerNorm eps 1e-5, init std 0.02 everywhere,
untied output head, dynamic prior head with bottleneck 192 (~194.1M parameters).
Its ablations at 0.5B tokens (parameter counts match the public run registry):
  _static_prior  head=static_prior                  (~184.7M; registry: 185M)
  _no_attn       mixer=decay                        (~172.9M; registry: 173M)
  _decay_only    mixer=decay, head=static_prior     (~163.6M; registry: 164M)
  _topk          encoder=topk (top floor(0.11 d) channels by |x|, straight-through; 194M)
Training details beyond "3B tokens" (0.5B for ablations) are not published; batch 64 x 1024,
AdamW lr 3e-4 cosine with 1k warmup is this repository's choice. Train on local shards with
data.source=files; the paper's 48000-token bilingual tokenizer is not shipped here.
"""
from jaxlm.config import Config, DataConfig, ModelConfig, SpikingConfig, TrainConfig


# Layers unrolled and the loss in 8 chunks. H200, batch 32 x 1024, session 22, each A/B in one
# process: scanned 106.3 ms a step, unrolled 96.6 (30.9 -> 35.4 GB); loss_chunks 1 -> 8: 106.0
# -> 105.7 ms, 30.9 -> 14.6 GB (the [tokens, 48000] logits and their gradient are never whole).
# The two together are not timed yet.
def _model(spiking: SpikingConfig = SpikingConfig()) -> ModelConfig:
  return ModelConfig(kind="symboliclight", vocab_size=48000, d_model=768, n_layers=12,
                     n_heads=12, n_kv_heads=12, head_dim=64, d_ff=4096, max_seq_len=2048,
                     rope_base=1e4, norm_eps=1e-5, init_std=0.02, tie_embeddings=False,
                     dtype="bfloat16", remat="dots", scan_layers=False, spiking=spiking)


def _train(name: str, tokens: float) -> TrainConfig:
  steps = int(tokens // (64 * 1024))
  return TrainConfig(steps=steps, batch_size=64, seq_len=1024, lr=3e-4, min_lr_ratio=0.1,
                     warmup_steps=min(1000, steps // 10), grad_clip=1.0, checkpoint_every=1000,
                     eval_every=1000, output_dir=f"runs/{name}", loss_chunks=8)


def _preset(name: str, tokens: float, **spiking) -> Config:
  return Config(name=name, model=_model(SpikingConfig(window=256, n_anchors=4, **spiking)),
                train=_train(name, tokens))


SYMBOLICLIGHT_194M = _preset("symboliclight_194m", 3e9)
ABLATIONS = [
    _preset("symboliclight_194m_static_prior", 5e8, head="static_prior"),
    _preset("symboliclight_194m_no_attn", 5e8, mixer="decay"),
    _preset("symboliclight_194m_decay_only", 5e8, mixer="decay", head="static_prior"),
    _preset("symboliclight_194m_topk", 5e8, encoder="topk"),
]

# Trains on CPU in minutes; f32 compute because bf16 is emulated on CPU.
TINY_SYMBOLICLIGHT_CPU = Config(
    name="tiny_symboliclight_cpu",
    model=ModelConfig(kind="symboliclight", vocab_size=2048, d_model=128, n_layers=4, n_heads=4,
                      n_kv_heads=4, d_ff=512, max_seq_len=512, rope_base=1e4, norm_eps=1e-5,
                      init_std=0.02, dtype="float32", scan_layers=True,
                      spiking=SpikingConfig(window=64, n_anchors=4)),
    train=TrainConfig(steps=500, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50,
                      log_every=25, eval_every=100, eval_batches=8, checkpoint_every=100,
                      output_dir="runs/tiny_symboliclight_cpu"),
    data=DataConfig(),
)

PRESETS = {c.name: c for c in [SYMBOLICLIGHT_194M, *ABLATIONS, TINY_SYMBOLICLIGHT_CPU]}
