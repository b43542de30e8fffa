"""Decoding with the stacked caches carried through the layers (stacking.scan_blocks_decode).

Every model kind, scanned and unrolled: a prefill then one token at a time equals the full
forward, MoE included (no other test decodes an MoE model). And the compiled decode step does
not hold a second copy of the cache (it did: the caches went through the layer scan as inputs
and came back as new stacked outputs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import configs
from jaxlm.config import AttentionConfig, apply_overrides
from jaxlm.models import build
from tests.jaxlm.conftest import random_params, tiny_model

B, T, PREFILL = 2, 20, 7
SMALL = ["model.n_layers=2", "model.vocab_size=64", "model.max_seq_len=2048", "train.seq_len=32"]


def _moe(preset: str, *extra):
  return apply_overrides(configs.get_preset(preset), [*SMALL, "model.d_model=32",
                                                      "model.d_ff=64", *extra]).model


MODELS = {
    "dense_scanned": tiny_model(vocab_size=64),
    "dense_unrolled": tiny_model(vocab_size=64, scan_layers=False),
    "vanilla_moe_scanned": _moe("tiny_vanilla_moe_cpu", "model.scan_layers=true"),
    "unipool_unrolled": _moe("tiny_unipool_cpu", "model.scan_layers=false",
                             "model.moe.n_experts=8"),
    "unipool_deferred_scanned": _moe("tiny_unipool_cpu", "model.scan_layers=true",
                                     "model.moe.n_experts=8", "model.moe.pool_grad=deferred"),
    "nsa_unrolled": tiny_model(vocab_size=64, scan_layers=False, attention=AttentionConfig(
        kind="nsa", nsa_block_len=4, nsa_stride=2, nsa_select_len=4, nsa_top_n=2,
        nsa_window=4)),
    "symboliclight_unrolled": apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), [
        *SMALL, "model.d_model=32", "model.scan_layers=false"]).model,
}


def _tokens(vocab=64, seed=3):
  return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_equals_full_forward(name):
  fm = build(MODELS[name])
  params = random_params(fm, std=0.1)
  toks = _tokens(fm.cfg.vocab_size)
  full = np.asarray(jax.jit(lambda p, t: fm.apply(p, t)[0])(params, toks))
  step = jax.jit(lambda p, t, c: fm.apply(p, t, cache=c))
  cache = fm.init_cache(B, T, jnp.float32)
  logits, cache = step(params, toks[:, :PREFILL], cache)
  outs = [np.asarray(logits)]
  for t in range(PREFILL, T):
    logits, cache = step(params, toks[:, t:t + 1], cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=5e-5, rtol=5e-5)
  assert np.asarray(cache["lengths"]).tolist() == [T] * B


# 4 layers, head_dim 128: the cache (2 x 128 values a token, layer and kv head) outweighs the
# attention's own temporaries (a few values a token and head)
WIDE = {"dense": tiny_model(vocab_size=64, d_model=256, n_heads=2, n_kv_heads=2, d_ff=64,
                            n_layers=4),
        "nsa": tiny_model(vocab_size=64, d_model=256, n_heads=2, n_kv_heads=2, d_ff=64,
                          n_layers=4, scan_layers=False,
                          attention=MODELS["nsa_unrolled"].attention),
        "symboliclight": apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), [
            *SMALL, "model.n_layers=4", "model.d_model=256", "model.n_heads=2",
            "model.n_kv_heads=2"]).model}


@pytest.mark.gpu_aot
@pytest.mark.parametrize("name", list(WIDE))
def test_decode_step_holds_no_second_cache(name):
  """The one-token step compiled for an H200 (cache donated): XLA's temporaries hold a layer's
  slices copied for the attention's kernels or matmuls (up to 2 of the 4 layers' worth for
  SymbolicLight), not the whole cache again. Before, they
  matched the cache: 2.19 GiB for dense_1b's 2.25 GiB at batch 8 x 4096. The CPU compiler keeps
  copies either way, so it cannot tell."""
  from jaxlm import aot
  from jaxlm.config import Config, TrainConfig
  cfg = Config(model=WIDE[name], train=TrainConfig(batch_size=B, seq_len=32))
  r = aot.compile_decode_step(cfg, aot.topology_devices("h200"), "h200", batch=8,
                              cache_len=2048)
  cache_bytes = r.output_bytes          # the new cache (and the sampled tokens)
  assert cache_bytes > 8 * 2048 * 2 * 128 * 2
  assert r.temp_bytes < 0.75 * cache_bytes, (r.temp_bytes, cache_bytes)   # 4 layers
