"""NSA attention in the transformer (jaxlm/layers/nsa.py): shapes, logical axes, causality,
decode == full forward token by token, generation, config errors, gradients, training, the
gate aux metrics of the train step, and experiments/ablate_nsa.py end to end."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import configs
from jaxlm.config import AttentionConfig, Config, ConfigError, TrainConfig, apply_overrides
from jaxlm.generate import Sampling, generate
from jaxlm.layers import nsa as nsa_layer
from jaxlm.models import build
from jaxlm.sharding import RULES
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import train_step
from tests.jaxlm.conftest import random_params, tiny_model

# l=4, d=2, l'=4, n=4 (first + 2 local forced), w=8: a 40-token sequence has 19 compressed
# keys and 10 selection blocks, so every branch and the top-n choice among blocks matter.
SMALL = dict(kind="nsa", nsa_block_len=4, nsa_stride=2, nsa_select_len=4, nsa_top_n=4,
             nsa_window=8)
T = 40


def _model(**kw):
  attn = dict(SMALL, **kw.pop("attention", {}))
  return tiny_model(attention=AttentionConfig(**attn), max_seq_len=64, **kw)


def _tokens(b=2, t=T, vocab=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _fwd(fm):
  return jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))


@functools.lru_cache(maxsize=None)
def _dec(fm):
  return jax.jit(lambda p, t, c: fm.apply(p, t, cache=c))


VARIANTS = {
    "scanned": dict(),
    "unscanned_shared_kv": dict(scan_layers=False, attention=dict(nsa_shared_kv=True)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shapes_aux_and_axes(variant):
  m = _model(**VARIANTS[variant])
  fm = build(m)
  params = random_params(fm)
  logits, cache, aux = _fwd(fm)(params, _tokens())
  assert logits.shape == (2, T, m.vocab_size) and cache is None
  assert np.isfinite(np.asarray(logits)).all()
  for n in nsa_layer.BRANCHES:
    assert aux[f"layer_gate_{n}"].shape == (m.n_layers,)
    assert 0 < float(aux[f"gate_{n}"]) < 1
  # every param named by rule-table axes, one name per dim
  shapes, axes = fm.param_shapes, fm.logical_axes
  for s, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: type(x) is tuple)):
    assert len(ax) == s.ndim and all(a in RULES for a in ax), (s, ax)
  blk = params["blocks"]["attn"] if m.scan_layers else params["blocks"][0]["attn"]
  kv = {k for k in blk if k.startswith(("wk_", "wv_"))}
  want = {"wk_shared", "wv_shared"} if m.attention.nsa_shared_kv else {
      f"w{x}_{n}" for x in "kv" for n in nsa_layer.BRANCHES}
  assert kv == want
  assert set(blk) >= {"compress_k", "compress_v", "w_gate_cmp", "b_gate_win", "wq", "wo"}
  cache = fm.init_cache(3, 50)
  assert set(fm.cache_axes) == set(cache)
  assert cache["kc"].shape == (m.n_layers, 3, (50 - 4) // 2 + 1, m.n_kv_heads, m.resolved_head_dim)


def test_causality():
  """Changing token p never changes logits before p (every branch, incl. the compressed one)."""
  fm = build(_model())
  params = random_params(fm)
  toks = _tokens(b=1)
  base = np.asarray(_fwd(fm)(params, toks)[0])
  for p in (3, 11, 24, 39):
    other = toks.at[:, p:].set((toks[:, p:] + 7) % 64)
    out = np.asarray(_fwd(fm)(params, other)[0])
    np.testing.assert_array_equal(out[:, :p], base[:, :p])
    assert np.abs(out[:, p] - base[:, p]).max() > 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_full_forward(variant):
  """Prefill 7 tokens, then one token at a time: logits equal the training path's."""
  fm = build(_model(**VARIANTS[variant]))
  params = random_params(fm)
  toks = _tokens()
  full = np.asarray(_fwd(fm)(params, toks)[0])
  cache = fm.init_cache(2, T)
  dec = _dec(fm)
  logits, cache = dec(params, toks[:, :7], cache)
  outs = [np.asarray(logits)]
  for i in range(7, T):
    logits, cache = dec(params, toks[:, i:i + 1], cache)
    outs.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(cache["lengths"]), [T, T])


def test_decode_short_cache_has_no_compressed_blocks():
  """A cache shorter than one compression block: only the selected and window branches."""
  fm = build(_model(attention=dict(nsa_block_len=8, nsa_stride=4)))
  params = random_params(fm)
  toks = _tokens(t=6)
  full = np.asarray(_fwd(fm)(params, toks)[0])
  logits, _ = _dec(fm)(params, toks, fm.init_cache(2, 6))
  np.testing.assert_allclose(np.asarray(logits), full, atol=2e-5, rtol=2e-5)


def test_generate_greedy_equals_argmax_of_full_forwards():
  fm = build(_model())
  params = random_params(fm, std=0.3)
  prompt = _tokens(t=5, seed=1)
  new = 16
  got = np.asarray(generate(fm, params, prompt, jax.random.key(0), max_new_tokens=new,
                            sampling=Sampling(temperature=0.0)))
  buf = np.zeros((2, 5 + new), np.int32)
  buf[:, :5] = np.asarray(prompt)
  fwd = jax.jit(lambda p, t: fm.apply(p, t)[0])
  for i in range(new):
    buf[:, 5 + i] = np.asarray(fwd(params, jnp.asarray(buf)))[:, 4 + i].argmax(-1)
  np.testing.assert_array_equal(got, buf[:, 5:])


@pytest.mark.parametrize("override, field", [
    (["model.attention.nsa_block_len=6"], "model.attention.nsa_block_len"),
    (["model.attention.nsa_select_len=20"], "model.attention.nsa_select_len"),
    (["model.attention.nsa_stride=0"], "model.attention.nsa_stride"),
    (["model.attention.nsa_top_n=0"], "model.attention.nsa_top_n"),
    (["model.attention.nsa_top_n=2"], "model.attention.nsa_top_n"),
    (["model.attention.nsa_window=0"], "model.attention.nsa_window"),
    (["model.attention.nsa_n_local=-1"], "model.attention.nsa_n_local"),
    (["model.attention.nsa_compress_hidden=-2"], "model.attention.nsa_compress_hidden"),
    (["model.attention.window=16"], "model.attention.window"),
    (["model.attention.soft_cap=30"], "model.attention.soft_cap"),
    (["model.attention.nsa_top_n=x"], "model.attention.nsa_top_n"),
    (["model.attention.nsa_strid=2"], "model.attention.nsa_strid"),
])
def test_config_errors_name_the_field(override, field):
  with pytest.raises(ConfigError) as e:
    apply_overrides(configs.get_preset("tiny_nsa_cpu"), override)
  assert str(e.value).startswith(field), str(e.value)


def test_nsa_needs_transformer_and_presets_validate():
  with pytest.raises(ConfigError, match="^model.attention.kind"):
    apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), ["model.attention.kind=nsa"])
  tiny = apply_overrides(configs.get_preset("tiny_nsa_cpu"), [])
  a = tiny.model.attention
  assert a.kind == "nsa" and tiny.train.seq_len // a.nsa_select_len >= 4
  assert (tiny.train.seq_len - a.nsa_block_len) // a.nsa_stride + 1 >= 8
  big = apply_overrides(configs.get_preset("nsa_1b"), [])
  dense = configs.get_preset("dense_1b")
  # dense_1b with the paper's GQA group of 16 query heads per kv head
  assert big.model == dataclasses.replace(dense.model, n_kv_heads=1, scan_layers=True,
                                          attention=big.model.attention)
  assert big.model.n_heads // big.model.n_kv_heads == 16
  assert (big.model.attention.nsa_block_len, big.model.attention.nsa_stride,
          big.model.attention.nsa_select_len, big.model.attention.nsa_top_n,
          big.model.attention.nsa_window) == (32, 16, 64, 16, 512)


TS = 24  # training tests: 11 compressed keys, 6 selection blocks


def _cfg():
  # weight_decay 0: after the first step a param has moved iff its gradient is non-zero
  return Config(model=_model(), train=TrainConfig(steps=25, batch_size=4, seq_len=TS, lr=1e-2,
                                                  warmup_steps=0, eps=1e-4, weight_decay=0.0))


def test_train_step_grads_gates_and_loss_falls():
  """Gradients are finite and reach every param (each one moves in the first step); a tiny NSA
  model learns a repeating pattern; nsa/gate_* metrics are in the step's output."""
  cfg = _cfg()
  fm = build(cfg.model)
  params = random_params(fm, std=0.05)
  tx = make_optimizer(cfg.train)
  state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params),
                     jnp.zeros((2,), jnp.uint32))
  rng = np.random.default_rng(0)
  cycle = rng.permutation(64)[:12]
  step = jax.jit(functools.partial(train_step, fm=fm, cfg=cfg, tx=tx))
  losses = []
  for i in range(cfg.train.steps):
    offs = rng.integers(0, 12, 4)
    seq = np.stack([cycle[(o + np.arange(TS + 1)) % 12] for o in offs]).astype(np.int32)
    state, m = step(state, {"inputs": seq[:, :-1], "targets": seq[:, 1:]})
    losses.append(float(m["loss"]))
    assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["grad_norm"]))
    if i == 0:
      moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           state.params, params)
      still = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(moved)
               if not v]
      assert not still, f"no gradient reaches {still}"
  for n in nsa_layer.BRANCHES:
    assert 0 < float(m[f"nsa/gate_{n}"]) < 1
    assert m[f"nsa/layer_gate_{n}"].shape == (cfg.model.n_layers,)
  assert int(m["nonfinite"]) == 0
  assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses


def _ablation(tmp_path, **kw):
  import experiments.ablate_nsa as ab
  text = ab.run_ablation("tiny", str(tmp_path), steps=2, eval_every=2, batch_size=2, seq_len=64,
                         eval_batches=1, devices=jax.devices()[:1], **kw)
  for f in ("results.md", "loss_curves.png", "results.json"):
    assert os.path.getsize(tmp_path / f) > 0, f
  assert "tiny_cpu" in text and "tiny_nsa_cpu" in text and "relative difference" in text
  assert "| mean |" in text
  return text


@pytest.mark.slow  # the ablation script end to end: ~70 s of a 2-core CI run
def test_ablation_script_end_to_end_small(tmp_path):
  """experiments/ablate_nsa.py, 2 steps of the tiny pair shrunk to one narrow layer."""
  text = _ablation(tmp_path, overrides=("model.n_layers=1", "model.d_model=64", "model.d_ff=128"))
  assert "| 0 |" in text and "| 1 |" not in text.split("val loss by step")[0]


@pytest.mark.slow
def test_ablation_script_end_to_end_tiny_preset(tmp_path):
  """The same with the tiny presets as they are (4 layers, d 256)."""
  _ablation(tmp_path)


def test_moe_ffn_with_nsa_attention_trains_forward():
  """NSA attention also sits in MoE blocks (training forward; MoE aux reported, no decode)."""
  from jaxlm.config import MoEConfig
  m = _model(moe=MoEConfig(kind="vanilla", n_experts=4, top_k=1, balance_loss=1e-2))
  fm = build(m)
  params = random_params(fm)
  logits, _, aux = _fwd(fm)(params, _tokens())
  assert logits.shape == (2, T, m.vocab_size) and np.isfinite(np.asarray(logits)).all()
  assert "aux_loss" in aux
  with pytest.raises(ValueError, match="moe.kind"):
    fm.init_cache(1, 8)


@pytest.mark.parametrize("which", ["nsa", "attention"])
def test_masked_scores_far_above_the_max_keep_gradients_finite(which):
  """A masked key scoring > 88 above the visible ones overflowed exp(s - m) to inf and where's
  gradient made NaN of it (NSA training went non-finite after ~70 steps of tiny_nsa_cpu)."""
  q = jnp.full((1, 2, 1, 4), 10.0)
  k = jnp.stack([jnp.full(4, -10.0), jnp.full(4, 10.0)])[None, :, None, :]
  v = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 1, 4)), jnp.float32)
  mask = jnp.array([[True, False], [True, True]])
  if which == "nsa":
    from ops.nsa import reference as ref
    f = lambda q, k, v: ref.masked_attention(q, k, v, mask[None, None], scale=1.0)[0]
  else:
    from ops.attention import reference as ref
    f = lambda q, k, v: ref.masked_attention(q, k, v, mask[None], scale=1.0, soft_cap=None)[0]
  w = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 1, 4)), jnp.float32)
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads[2])).sum() > 0
