"""Train stack: the pure train step (loss, grad accumulation, z-loss, non-finite skip),
the lr schedule, FLOP accounting, and the Trainer loop on tiny local text."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.config import Config, TrainConfig
from jaxlm.models import build
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import model_flops
from jaxlm.train.optimizer import lr_schedule, make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import token_losses, train_step
from tests.jaxlm.conftest import random_params, tiny_model, tiny_run_config

B, S = 8, 16


def _cfg(**train) -> Config:
  # warmup 0: the first step already moves the params. eps 1e-4: Adam's first update
  # g/(|g|+eps) is smooth in g (with eps 1e-8 it is sign(g), and f32 summation-order noise
  # flips near-zero gradient entries, which the grad-accumulation comparison would trip on).
  base = dict(steps=50, batch_size=B, seq_len=S, lr=1e-2, warmup_steps=0, eps=1e-4, grad_clip=1.0)
  base.update(train)
  return Config(model=tiny_model(), train=TrainConfig(**base))


def _state(cfg: Config, params=None) -> TrainState:
  fm = build(cfg.model)
  params = random_params(fm, std=0.05) if params is None else params
  tx = make_optimizer(cfg.train)
  return TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params),
                    jnp.zeros((2,), jnp.uint32))


@functools.lru_cache(maxsize=None)
def _step_fn(cfg: Config):
  """One jitted step per distinct config (compiling a step costs seconds on a busy CPU)."""
  return jax.jit(functools.partial(train_step, fm=build(cfg.model), cfg=cfg,
                                   tx=make_optimizer(cfg.train)))


def _pattern_batch(b=B, s=S, period=12, vocab=64, seed=0) -> dict:
  """Rows of a fixed repeating sequence at random offsets: next token is predictable."""
  rng = np.random.default_rng(seed)
  cycle = rng.permutation(vocab)[:period]
  offsets = rng.integers(0, period, b)
  seq = np.stack([cycle[(o + np.arange(s + 1)) % period] for o in offsets]).astype(np.int32)
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((b, s), np.float32)}


def _random_batch(b=B, s=S, vocab=64, seed=0) -> dict:
  """Every test batch has the same structure (with a loss_mask), so steps share one compile."""
  t = np.random.default_rng(seed).integers(0, vocab, (b, s + 1)).astype(np.int32)
  return {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((b, s), np.float32)}


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------ the pure step

def test_loss_falls_on_a_learnable_batch():
  cfg = _cfg()
  step = _step_fn(cfg)
  state = _state(cfg)
  batch = _pattern_batch()
  losses = []
  for _ in range(50):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert int(m["nonfinite"]) == 0
  assert int(state.step) == 50
  assert losses[0] > 0.8 * math.log(64)          # starts near uniform
  assert losses[-1] < 0.25 * losses[0], losses    # and learns the pattern
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_grad_accumulation_equals_one_big_batch():
  big = _random_batch(b=B, seed=3)  # grad_accum=4: 4 micro-batches of 2
  results = {}
  for accum in (1, 4):
    cfg = _cfg(grad_accum=accum)
    state, m = _step_fn(cfg)(_state(cfg), big)
    results[accum] = (state, m)
  (s1, m1), (s4, m4) = results[1], results[4]
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  assert float(m4["tokens"]) == float(m1["tokens"]) == B * S
  assert float(m1["lr"]) == pytest.approx(1e-2)
  moved = 0.0
  for a, b, p0 in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params),
                      jax.tree.leaves(_state(_cfg()).params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3 * 1e-2, rtol=0)
    moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(p0)).max()))
  assert moved > 1e-4  # the step did update the params
  # the moments hold (clipped) gradients: those agree tightly
  for a, b in zip(jax.tree.leaves(s4.opt_state), jax.tree.leaves(s1.opt_state)):
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5 * np.abs(b).max(), rtol=1e-4)


def test_loss_mask_weights_tokens():
  cfg = _cfg()
  fm = build(cfg.model)
  params = random_params(fm)
  batch = _random_batch()
  mask = np.zeros((B, S), np.float32)
  mask[:, : S // 2] = 1
  fn = jax.jit(lambda p, b: (token_losses(fm, p, b, 0.0), fm.apply(p, b["inputs"])[0]))
  (total, (sums, n)), logits = fn(params, dict(batch, loss_mask=mask))
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  assert float(n) == B * S // 2
  np.testing.assert_allclose(float(total), (ce * mask).sum(), rtol=1e-5)


def test_z_loss_adds_coefficient_times_mean_squared_logsumexp():
  coef = 1e-2
  cfg0 = _cfg()
  cfgz = dataclasses.replace(cfg0, train=dataclasses.replace(cfg0.train, z_loss=coef))
  fm = build(cfg0.model)
  params = random_params(fm)
  batch = _random_batch(seed=5)

  @jax.jit
  def terms(p, b):
    lse = jax.nn.logsumexp(fm.apply(p, b["inputs"])[0], axis=-1)
    return token_losses(fm, p, b, 0.0)[0], token_losses(fm, p, b, coef)[0], lse

  @jax.jit
  def grad_of_objective(p, b, c):  # mean(ce) + c * mean(lse^2), written out independently
    def objective(p):
      lg = fm.apply(p, b["inputs"])[0]
      ce = optax.softmax_cross_entropy_with_integer_labels(lg, b["targets"])
      return jnp.mean(ce) + c * jnp.mean(jnp.square(jax.nn.logsumexp(lg, axis=-1)))
    return optax.global_norm(jax.grad(objective)(p))

  t0, tz, lse = terms(params, batch)
  lse = np.asarray(lse, np.float64)
  # the objective: token_losses' total grows by exactly coef * sum(lse^2)
  np.testing.assert_allclose(float(tz) - float(t0), coef * np.sum(lse ** 2), rtol=1e-4)
  # the step reports ce as `loss` in both cases and the mean lse^2 as `z_loss`
  _, m0 = _step_fn(cfg0)(_state(cfg0, params), batch)
  _, mz = _step_fn(cfgz)(_state(cfgz, params), batch)
  np.testing.assert_allclose(float(mz["loss"]), float(m0["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(mz["z_loss"]), np.mean(lse ** 2), rtol=1e-5)
  # and the step's (pre-clip) gradient is that of mean(ce) + coef * mean(lse^2)
  for c, m in ((0.0, m0), (coef, mz)):
    np.testing.assert_allclose(float(m["grad_norm"]), float(grad_of_objective(params, batch, c)),
                               rtol=1e-4)
  assert abs(float(mz["grad_norm"]) - float(m0["grad_norm"])) > 1e-4 * float(m0["grad_norm"])


def test_nan_batch_leaves_state_unchanged():
  """A NaN in the batch's loss_mask makes loss and grads NaN: the update is skipped."""
  cfg = _cfg()
  step = _step_fn(cfg)
  state = _state(cfg)
  good = _random_batch()
  bad = dict(good, loss_mask=good["loss_mask"].copy())
  bad["loss_mask"][1, 3] = np.nan
  state, m = step(state, good)  # one real step so opt_state is not all zeros
  assert int(m["nonfinite"]) == 0
  before = jax.device_get(state)
  after, m = step(state, bad)
  assert int(m["nonfinite"]) == 1
  assert not np.isfinite(float(m["loss"]))
  assert _leaves_equal(after.params, before.params)
  assert _leaves_equal(after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1
  # training goes on normally afterwards
  after2, m2 = step(after, good)
  assert int(m2["nonfinite"]) == 0 and np.isfinite(float(m2["loss"]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(after2.params))
  assert not _leaves_equal(after2.params, before.params)


def test_inf_param_step_is_skipped():
  """A non-finite parameter makes the loss non-finite: params and opt_state stay as they were."""
  cfg = _cfg()
  state = _state(cfg)
  params = jax.device_get(state.params)
  params["final_norm"]["scale"] = params["final_norm"]["scale"].copy()
  params["final_norm"]["scale"][0] = np.inf
  state = state._replace(params=jax.tree.map(jnp.asarray, params))
  before = jax.device_get(state)
  after, m = _step_fn(cfg)(state, _random_batch())
  assert int(m["nonfinite"]) == 1
  assert _leaves_equal(after.params, before.params)
  assert _leaves_equal(after.opt_state, before.opt_state)


# ------------------------------------------------------------------ schedule and FLOPs

def test_lr_schedule_warms_up_then_decays_to_min():
  t = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
  sched = lr_schedule(t)
  lrs = np.array([float(sched(i)) for i in range(t.steps + 1)])
  assert lrs[0] == 0.0
  np.testing.assert_allclose(lrs[t.warmup_steps], t.lr, rtol=1e-6)
  assert np.all(np.diff(lrs[: t.warmup_steps + 1]) > 0)
  assert np.all(np.diff(lrs[t.warmup_steps:]) <= 1e-12)
  np.testing.assert_allclose(lrs[t.steps], t.lr * t.min_lr_ratio, rtol=1e-5)
  np.testing.assert_allclose(float(sched(10 * t.steps)), t.lr * t.min_lr_ratio, rtol=1e-5)
  # cosine: half-way through the decay the lr is half-way between peak and floor
  mid = t.warmup_steps + (t.steps - t.warmup_steps) // 2
  np.testing.assert_allclose(lrs[mid], t.lr * (1 + t.min_lr_ratio) / 2, rtol=1e-2)
  # no warmup: the very first step uses the peak lr, then the same cosine decay
  t0 = dataclasses.replace(t, warmup_steps=0)
  assert float(lr_schedule(t0)(0)) == pytest.approx(t.lr, rel=1e-6)
  assert float(lr_schedule(t0)(t.steps)) == pytest.approx(t.lr * t.min_lr_ratio, rel=1e-5)
  assert float(lr_schedule(t0)(t.steps // 2)) == pytest.approx(t.lr * (1 + t.min_lr_ratio) / 2, rel=1e-5)


def test_step_reports_the_scheduled_lr():
  cfg = _cfg()
  step = _step_fn(cfg)
  state = _state(cfg)
  batch = _random_batch()
  for i in range(3):
    state, m = step(state, batch)
    assert float(m["lr"]) == pytest.approx(float(lr_schedule(cfg.train)(i)), rel=1e-6)


def test_flops_per_token_is_six_n_plus_attention():
  m = tiny_model(vocab_size=300, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
  fm = build(m)
  n_vectors = (2 * m.n_layers + 1) * m.d_model  # RMSNorm scales
  n_embed = m.vocab_size * m.d_model
  n_matmul = fm.num_params() - n_embed - n_vectors  # blocks' matrices + output head
  assert model_flops.train_flops_per_token(m, 0) == pytest.approx(6 * n_matmul)
  seq = 32
  # fwd+bwd = 3 × (QKᵀ + PV: 2 × 2·head_dim flops per head per key) × seq/2 keys on average
  attn = 3 * m.n_layers * m.n_heads * 2 * 2 * m.resolved_head_dim * seq / 2
  assert model_flops.train_flops_per_token(m, seq) == pytest.approx(6 * n_matmul + attn)
  # a tied head still costs its matmul
  tied = dataclasses.replace(m, tie_embeddings=True)
  assert model_flops.train_flops_per_token(tied, 0) == pytest.approx(6 * n_matmul)
  # for a real model at its training length the 6N term dominates
  from jaxlm import configs
  big = configs.get_preset("dense_125m")
  f = model_flops.train_flops_per_token(big.model, big.train.seq_len)
  six_n = model_flops.train_flops_per_token(big.model, 0)
  assert 1.0 < f / six_n < 1.2
  assert 6 * 80e6 < six_n < 6 * 140e6


def test_peak_tflops_lookup():
  assert metrics_lib.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert metrics_lib.peak_tflops("TPU v5 lite") == 197.0
  assert metrics_lib.peak_tflops("cpu") is None
  assert metrics_lib.peak_tflops("cpu", 1.5) == 1.5


# ------------------------------------------------------------------ the Trainer loop

@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_paths):
  from jaxlm.train.loop import Trainer
  tmp = tmp_path_factory.mktemp("trainer")
  cfg = tiny_run_config(tmp, text_paths, train=dict(steps=40, lr=1e-2, warmup_steps=4,
                                                    checkpoint_every=20, eval_every=20))
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  result = trainer.run(progress=False)
  yield trainer, result, cfg
  trainer.close()


def test_trainer_loss_falls_and_logs(trained):
  trainer, result, cfg = trained
  assert result.final_step == cfg.train.steps
  with open(os.path.join(cfg.train.output_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, cfg.train.steps + 1))
  losses = [r["loss"] for r in rows]
  assert all(np.isfinite(losses))
  assert losses[0] > 0.7 * math.log(cfg.model.vocab_size)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
  assert result.train_loss == pytest.approx(losses[-1])
  assert result.tokens_per_s and result.tokens_per_s > 0
  assert result.mfu is None  # CPU: no known peak
  assert os.listdir(os.path.join(cfg.train.output_dir, "tensorboard"))
  assert trainer.ckpt.all_steps() == [20, 40]


def test_trainer_evaluate_returns_loss_and_perplexity(trained):
  trainer, result, _ = trained
  ev = trainer.evaluate(trainer.state.params)
  assert np.isfinite(ev["loss"]) and ev["loss"] > 0
  assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
  assert result.val_loss == pytest.approx(ev["loss"], rel=1e-6)
  assert ev["loss"] < math.log(trainer.cfg.model.vocab_size)


def test_throughput_profile_hook_runs_extra_steps_on_the_live_state():
  from jaxlm import config as config_lib
  from jaxlm import configs
  from jaxlm.train.throughput import measure
  cfg = config_lib.apply_overrides(configs.get_preset("tiny_cpu"),
                                   ["train.seq_len=16", "train.batch_size=8"])
  losses = []

  def hook(one_step):
    # the state is donated by each step: the hook must be able to run several in a row
    losses.extend(float(one_step()["loss"]) for _ in range(2))

  r = measure(cfg, steps=1, warmup=1, profile=hook)
  assert r.step_ms > 0 and len(losses) == 2 and all(l == l for l in losses)


def test_mu_dtype_bfloat16_first_moment():
  """train.mu_dtype=bfloat16: AdamW's first moment is stored in bf16 (the second stays f32), the
  step still trains like the f32 one, and a bad dtype is refused by name."""
  from jaxlm.config import ConfigError, validate
  cfg32, cfg16 = _cfg(), _cfg(mu_dtype="bfloat16")
  params = random_params(build(cfg32.model), std=0.05)
  opt = make_optimizer(cfg16.train).init(params)
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(opt)
            if x.ndim >= 1 and x.size == max(y.size for y in jax.tree.leaves(params))}
  assert any(".mu" in k and d == jnp.bfloat16 for k, d in dtypes.items()), dtypes
  assert any(".nu" in k and d == jnp.float32 for k, d in dtypes.items()), dtypes
  batch = _pattern_batch()
  s32, s16 = _state(cfg32, params), _state(cfg16, params)
  for _ in range(5):
    s32, m32 = _step_fn(cfg32)(s32, batch)
    s16, m16 = _step_fn(cfg16)(s16, batch)
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
  with pytest.raises(ConfigError, match="train.mu_dtype: 'float16'"):
    validate(_cfg(mu_dtype="float16"))


def test_resume_refuses_another_mu_dtype():
  from jaxlm import config as config_lib
  from jaxlm.train.loop import check_resume_config
  stored = config_lib.to_dict(_cfg()) if hasattr(config_lib, "to_dict") else \
      dataclasses.asdict(_cfg())
  assert check_resume_config(stored, _cfg(lr=2e-2)) == ["train.lr: 0.01 -> 0.02"]
  with pytest.raises(config_lib.ConfigError, match="train.mu_dtype is 'float32' in the checkpoint"):
    check_resume_config(stored, _cfg(mu_dtype="bfloat16"))
