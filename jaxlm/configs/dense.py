"""Dense LLaMA-style presets: a CPU-sized one, ~125M and ~1B."""
from jaxlm.config import AttentionConfig, Config, DataConfig, ModelConfig, TrainConfig

# Trains on 2 CPU cores in a few minutes; f32 compute because bf16 is emulated on CPU.
TINY_CPU = Config(
    name="tiny_cpu",
    model=ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      d_ff=768, max_seq_len=512, dtype="float32", scan_layers=True),
    train=TrainConfig(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50,
                      log_every=25, eval_every=100, eval_batches=8, checkpoint_every=100,
                      output_dir="runs/tiny_cpu"),
    data=DataConfig(),
)

# ~134M parameters (85M non-embedding), GPT-3-small shapes with SwiGLU and untied embeddings.
DENSE_125M = Config(
    name="dense_125m",
    model=ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      d_ff=2048, max_seq_len=4096, dtype="bfloat16", remat="dots"),
    train=TrainConfig(steps=20000, batch_size=64, seq_len=1024, lr=6e-4, warmup_steps=500,
                      checkpoint_every=1000, eval_every=1000, output_dir="runs/dense_125m"),
)

# ~0.98B parameters: 18 layers × d 2048, GQA 16/8 heads, SwiGLU 5632.
# Layers unrolled (scan_layers=False): the scanned step sliced each layer's weights out of the
# stacked params with 216 copies a step (14.1 ms). H200, batch 8 x 4096, session 15, one process
# each: 420.2 ms per step scanned, 399.9 and 406.0 unrolled (compile 10 s -> 19-24 s); remat
# "none" instead of "dots" on top: 401.2, within the run-to-run spread, so "dots" stays.
DENSE_1B = Config(
    name="dense_1b",
    model=ModelConfig(vocab_size=32768, d_model=2048, n_layers=18, n_heads=16, n_kv_heads=8,
                      d_ff=5632, max_seq_len=4096, rope_base=500000.0, dtype="bfloat16",
                      remat="dots", scan_layers=False),
    train=TrainConfig(steps=50000, batch_size=256, seq_len=4096, lr=3e-4, warmup_steps=2000,
                      grad_accum=1, checkpoint_every=1000, eval_every=1000,
                      output_dir="runs/dense_1b"),
)

PRESETS = {c.name: c for c in (TINY_CPU, DENSE_125M, DENSE_1B)}
del AttentionConfig
