"""train.loss_chunks: the head and cross entropy a chunk of the sequence at a time.

Same loss terms and gradients as the whole-sequence loss (dense, tied head, MoE, SymbolicLight's
dynamic head, with a loss mask and z-loss), the same train step, no [batch, seq, vocab] array
in the step's program, no head matmul more than the unchunked step has, and a clear error for a
chunk count that does not divide the sequence.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import configs
from jaxlm.config import Config, ConfigError, TrainConfig, apply_overrides, validate
from jaxlm.models import build
from jaxlm.train.chunked_loss import head_loss, logit_sums, lse_and_target
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import TrainState
from jaxlm.train.step import token_losses, train_step
from tests.jaxlm.conftest import random_params, tiny_model
from tests.jaxlm.jaxpr_walk import all_eqns

B, S, V = 4, 16, 96


def _batch(b=B, s=S, vocab=V, seed=0):
  rng = np.random.default_rng(seed)
  t = rng.integers(0, vocab, (b, s + 1)).astype(np.int32)
  mask = (rng.random((b, s)) < 0.7).astype(np.float32)
  return {"inputs": t[:, :-1], "targets": t[:, 1:], "loss_mask": mask}


def _close(a, b, rtol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * max(np.abs(y).max(), 1e-6))


def test_head_loss_equals_whole_loss_in_x_and_head_params():
  """Chunk counts 2 / 4 / 16 against 1: objective (CE + z-loss), sums, and the gradients of x
  and of every param (the trunk's are zero: only x carries them)."""
  fm = build(tiny_model(vocab_size=V))
  params = random_params(fm, std=0.3)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(B, S, fm.cfg.d_model)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
  mask = jnp.asarray(rng.random((B, S)) < 0.6, jnp.float32)

  @functools.partial(jax.jit, static_argnums=2)
  def f(p, x, n):
    return jax.value_and_grad(lambda p, x: head_loss(fm, p, x, targets, mask, n, 0.1),
                              argnums=(0, 1), has_aux=True)(p, x)

  whole = f(params, x, 1)
  assert float(whole[0][0]) > 0
  for n in (2, 4, 16):
    _close(f(params, x, n), whole)


def test_chunks_must_divide_the_sequence():
  fm = build(tiny_model(vocab_size=V))
  with pytest.raises(ValueError, match="loss_chunks=3"):
    head_loss(fm, random_params(fm), jnp.zeros((1, 8, fm.cfg.d_model)),
              jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8)), 3)
  cfg = Config(model=tiny_model(), train=TrainConfig(batch_size=4, seq_len=16, loss_chunks=3))
  with pytest.raises(ConfigError, match="train.loss_chunks: 3 does not divide train.seq_len=16"):
    validate(cfg)
  with pytest.raises(ConfigError, match="train.loss_chunks: must be >= 1"):
    validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunks=0)))


MODELS = {
    "dense": tiny_model(vocab_size=V),
    "tied": tiny_model(vocab_size=V, tie_embeddings=True),
    "moe": apply_overrides(configs.get_preset("tiny_unipool_cpu"), [
        f"model.vocab_size={V}", "model.n_layers=2", "model.d_model=32", "model.d_ff=64",
        "model.moe.n_experts=4"]).model,
    "symboliclight": apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), [
        f"model.vocab_size={V}", "model.n_layers=2", "model.d_model=32"]).model,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_token_losses_and_grads_match_unchunked(name):
  fm = build(MODELS[name])
  params = random_params(fm, std=0.05)
  batch = _batch()

  @functools.partial(jax.jit, static_argnums=1)
  def f(p, n):
    return jax.value_and_grad(lambda p: token_losses(fm, p, batch, 1e-3, n), has_aux=True)(p)

  (t1, (s1, n1)), g1 = f(params, 1)
  (t4, (s4, n4)), g4 = f(params, 4)
  assert float(n1) == float(n4) == batch["loss_mask"].sum()
  _close((t4, s4), (t1, s1))
  _close(g4, g1, rtol=1e-4)


def _step(cfg):
  fm = build(cfg.model)
  tx = make_optimizer(cfg.train)
  return fm, tx, jax.jit(functools.partial(train_step, fm=fm, cfg=cfg, tx=tx))


def test_train_step_with_chunks_matches_and_holds_no_full_logits():
  base = Config(model=tiny_model(vocab_size=V),
                train=TrainConfig(batch_size=B, seq_len=S, lr=1e-2, warmup_steps=0, eps=1e-4))
  chunked = dataclasses.replace(base, train=dataclasses.replace(base.train, loss_chunks=4))
  fm, tx, step1 = _step(base)
  _, _, step4 = _step(chunked)
  params = random_params(fm, std=0.05)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jnp.zeros((2,), jnp.uint32))
  batch = _batch()
  s1, m1 = step1(state, batch)
  s4, m4 = step4(state, batch)
  _close({k: m4[k] for k in ("loss", "grad_norm", "tokens")},
         {k: m1[k] for k in ("loss", "grad_norm", "tokens")})
  _close(s4.params, s1.params, rtol=1e-4)

  jaxprs = {n: jax.make_jaxpr(step)(state, batch).jaxpr for n, step in ((1, step1), (4, step4))}

  def full_logits_arrays(n):
    return [e for e, _ in all_eqns(jaxprs[n]) for v in e.outvars
            if getattr(v.aval, "shape", None) == (B, S, V)]

  def head_matmuls(step):
    """Dots of the compiled program (dead code removed) with a vocab-sized dim."""
    shapes, found = {}, []
    for line in step.lower(state, batch).compile().as_text().splitlines():
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* (\w[\w\-]*)\((.*)", line)
      if not m:
        continue
      name, shape, op, rest = m.groups()
      shapes[name] = shape
      if op == "dot":
        dims = [shape] + [shapes.get(a, "") for a in re.findall(r"%([\w.\-]+)", rest)[:2]]
        if any(str(V) in re.findall(r"\d+", d) for d in dims):
          found.append(name)
    return found

  assert full_logits_arrays(1)        # the check can see them
  assert not full_logits_arrays(4)
  # logits, their input's gradient, the head weight's gradient: nothing recomputed
  assert len(head_matmuls(step1)) == len(head_matmuls(step4)) == 3


def test_chunks_with_grad_accumulation_and_z_loss():
  """grad_accum=2 x loss_chunks=4 with z-loss: the same step as one batch, one chunk."""
  base = Config(model=tiny_model(vocab_size=V),
                train=TrainConfig(batch_size=B, seq_len=S, lr=1e-2, warmup_steps=0, eps=1e-4,
                                  z_loss=1e-3))
  other = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=2,
                                                              loss_chunks=4))
  fm, tx, step1 = _step(base)
  _, _, step2 = _step(other)
  params = random_params(fm, std=0.05)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jnp.zeros((2,), jnp.uint32))
  batch = _batch(seed=3)
  s1, m1 = step1(state, batch)
  s2, m2 = step2(state, batch)
  _close({k: m2[k] for k in ("loss", "z_loss", "grad_norm")},
         {k: m1[k] for k in ("loss", "z_loss", "grad_norm")})
  _close(s2.params, s1.params, rtol=1e-4)


def test_chunks_on_a_sharded_mesh_match_one_device():
  """data 2 x fsdp 2 x tensor 2 (the head's vocab axis split over tensor): loss_chunks=4 gives
  the single-device, unchunked step."""
  from jaxlm import sharding
  from jaxlm.config import MeshConfig
  from jaxlm.train.state import init_state, state_layout
  from jaxlm.train.step import jit_train_step
  model = tiny_model(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
  train = TrainConfig(batch_size=8, seq_len=S, lr=1e-2, warmup_steps=0, eps=1e-4)

  def run(mesh_shape, chunks, n_devices):
    cfg = Config(model=model, train=dataclasses.replace(train, loss_chunks=chunks),
                 mesh=MeshConfig(*mesh_shape))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices])
    fm = build(cfg.model)
    tx = make_optimizer(cfg.train)
    _, shardings = state_layout(fm, tx, mesh)
    step = jit_train_step(fm, cfg, tx, mesh, shardings)
    batch = jax.device_put(_batch(b=8, seed=4), sharding.batch_sharding(mesh))
    with sharding.use_mesh(mesh):
      state = init_state(fm, tx, 0, mesh)
      for _ in range(2):
        state, m = step(state, batch)
      return jax.device_get((m, state.params))

  m1, p1 = run((1, 1, 1, 1), 1, 1)
  m8, p8 = run((2, 2, 2, 1), 4, 8)
  _close({k: m8[k] for k in ("loss", "grad_norm")}, {k: m1[k] for k in ("loss", "grad_norm")},
         rtol=1e-5)
  _close(p8, p1, rtol=1e-4)


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (40.0, 300.0), (40.0, -300.0)])
def test_lse_and_target_is_one_pass_and_exact(scale, shift):
  """The chunked loss's one-pass (max, Σ exp, target) reduction equals logsumexp and the target
  logit, also at magnitudes where a naive Σ exp overflows, with an odd vocab (the reduction's
  padding pairs initial partials with each other) and targets at both ends."""
  x = jax.random.normal(jax.random.key(0), (3, 7, 1001), jnp.float32) * scale + shift
  t = jax.random.randint(jax.random.key(1), (3, 7), 0, 1001).at[0, 0].set(0).at[0, 1].set(1000)
  lse, tgt = jax.jit(lse_and_target)(x, t)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(x, axis=-1), rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(tgt, jnp.take_along_axis(x, t[..., None], axis=-1)[..., 0])
  assert np.isfinite(np.asarray(lse)).all()
  # one reduction over the logits (jax.nn.logsumexp alone lowers to two)
  assert jax.jit(lse_and_target).lower(x, t).as_text().count("stablehlo.reduce") == 1


def test_logit_sums_value_and_gradient_equal_optax():
  """The unchunked loss (lse_and_target with its one-pass custom gradient) against optax's
  cross entropy and jax.nn.logsumexp under autodiff: CE + z-loss and d/d logits."""
  import optax
  x = jax.random.normal(jax.random.key(0), (3, 5, 101), jnp.float32) * 5.0
  t = jax.random.randint(jax.random.key(1), (3, 5), 0, 101)
  m = (jax.random.uniform(jax.random.key(2), (3, 5)) < 0.7).astype(jnp.float32)

  def ref(x):
    ce = optax.softmax_cross_entropy_with_integer_labels(x, t)
    return jnp.sum(ce * m) + 0.3 * jnp.sum(jnp.square(jax.nn.logsumexp(x, axis=-1)) * m)

  def ours(x):
    s = logit_sums(x, t, m)
    return s["ce"] + 0.3 * s["z"]

  _close(jax.value_and_grad(ours)(x), jax.value_and_grad(ref)(x))


def test_loss_over_a_vocab_sharded_axis_moves_partials_not_logits():
  """With the vocab split over 4 devices, the one-pass reduction (value and gradient) combines
  per-shard (max, Σ exp, target) partials: no collective moves logits-sized data."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated CPU) devices")
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.device_put(jnp.zeros((8, 16, 1024)), NamedSharding(mesh, P("data", None, "tensor")))
  t = jax.device_put(jnp.zeros((8, 16), jnp.int32), NamedSharding(mesh, P("data", None)))
  m = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", None)))
  f = jax.jit(jax.value_and_grad(lambda x: logit_sums(x, t, m)["ce"]))
  moved = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-gather|all-reduce|all-to-all)\(",
                     f.lower(x).compile().as_text())
  sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in moved]
  # a device's logits are [4, 16, 256]; its rows' partials from the 4 vocab shards [4, 16, 4]
  assert sizes and max(sizes) <= 4 * 16 * 4, sizes
