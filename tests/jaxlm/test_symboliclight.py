"""SymbolicLight (jaxlm/models/symboliclight.py): spike masks, carried-state decoding, encoder vs
ops.lif, chunked forward, ablation switches, logical axes, presets / config errors, training."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import configs
from jaxlm.config import (Config, ConfigError, ModelConfig, SpikingConfig, TrainConfig,
                          apply_overrides, validate)
from jaxlm.layers.spiking import heaviside, topk_mask
from jaxlm.models import symboliclight as sl
from jaxlm.models.functional import build
from jaxlm.sharding import RULES
from ops.lif import reference as lif_reference


def tiny(scan_layers=True, **spiking) -> ModelConfig:
  sp = dict(window=4, n_anchors=2)
  sp.update(spiking)
  return ModelConfig(kind="symboliclight", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                     n_kv_heads=2, d_ff=64, max_seq_len=64, rope_base=1e4, norm_eps=1e-5,
                     init_std=0.1, dtype="float32", scan_layers=scan_layers,
                     spiking=SpikingConfig(**sp))


@functools.lru_cache(maxsize=None)
def _fwd(fm):
  return jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))


@functools.lru_cache(maxsize=None)
def _cached(fm):
  return jax.jit(lambda p, t, c: fm.apply(p, t, cache=c))


def tokens(b=2, s=16, seed=1, vocab=64):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab, jnp.int32)


# ----------------------------------------------------------------------------- spike masks

class TestSpikeMask:
  """At the mixer level: a token without spikes is neither a key nor a query of the local
  attention and adds nothing to the decay state, so perturbing its continuous input (hence its
  k / v) changes the mixer's output nowhere but at itself."""

  S, J = 12, 5   # sequence length, the perturbed token

  def _setup(self, mixer, spikes_at_j: bool):
    cfg = tiny(mixer=mixer, window=3, n_anchors=1)
    mixer_mod = sl.SparseTCAM(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(mixer_mod)
    kx, ks = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, self.S, 32))
    spikes = (jax.random.uniform(ks, (2, self.S, 32)) < 0.2).astype(jnp.float32)
    spikes = spikes.at[:, 1:4].set(0.0)          # more silent tokens (queries and keys)
    if not spikes_at_j:
      spikes = spikes.at[:, self.J].set(0.0)
    pos = jnp.broadcast_to(jnp.arange(self.S, dtype=jnp.int32), (2, self.S))

    @jax.jit
    def run(x):
      y, _, active = nnx.merge(graphdef, state)(x, spikes, pos)
      return y, active

    x2 = x.at[:, self.J].add(3.0 * jax.random.normal(jax.random.key(9), (2, 32)))
    return run, x, x2

  @pytest.mark.parametrize("mixer", ["dual", "attention", "decay"])
  def test_silent_token_changes_nothing_elsewhere(self, mixer):
    run, x, x2 = self._setup(mixer, spikes_at_j=False)
    (y1, active), (y2, _) = run(x), run(x2)
    assert not bool(active[:, self.J].any())
    others = np.r_[0:self.J, self.J + 1:self.S]
    np.testing.assert_array_equal(np.asarray(y1)[:, others], np.asarray(y2)[:, others])
    assert not np.allclose(y1[:, self.J], y2[:, self.J])      # the perturbation is real

  def test_spiking_token_is_a_key_inside_its_window_only(self):
    run, x, x2 = self._setup("attention", spikes_at_j=True)
    (y1, active), (y2, _) = run(x), run(x2)
    diff = np.abs(np.asarray(y1) - np.asarray(y2)).max(-1)        # [b, s]
    act = np.asarray(active)
    window = 3
    for i in range(self.S):
      visible = self.J <= i < self.J + window
      if i == self.J:
        continue
      if not visible or not act[:, i].any():
        assert diff[:, i].max() == 0.0, (i, diff[:, i])
      else:
        assert diff[act[:, i], i].min() > 0, (i, diff[:, i])     # the mask is not all-closed

  def test_anchor_tokens_visible_beyond_the_window(self):
    cfg = tiny(mixer="attention", window=2, n_anchors=1)
    mixer_mod = sl.SparseTCAM(cfg, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(mixer_mod)
    spikes = jnp.zeros((1, 10, 32)).at[:, :, 0].set(1.0)          # every token active
    pos = jnp.arange(10, dtype=jnp.int32)[None]
    x = jax.random.normal(jax.random.key(0), (1, 10, 32))
    run = jax.jit(lambda x: nnx.merge(graphdef, state)(x, spikes, pos)[0])
    for j, far_changes in ((0, True), (1, False)):                # 0 is the anchor
      d = np.abs(np.asarray(run(x) - run(x.at[:, j].add(2.0)))).max(-1)[0]
      assert (d[9] > 0) == far_changes, (j, d)


# ------------------------------------------------------------------- encoder, heaviside, topk

def test_encoder_spikes_equal_ops_lif():
  cfg = tiny()
  fm = build(cfg)
  params = fm.init(jax.random.key(0))
  toks = tokens()
  emb = params["embed"]["embedding"][toks]
  mean = emb.mean(-1, keepdims=True)
  var = ((emb - mean) ** 2).mean(-1, keepdims=True)
  x = (emb - mean) / jnp.sqrt(var + cfg.norm_eps) * params["encoder_norm"]["scale"] + params[
      "encoder_norm"]["bias"]
  want, v_last = lif_reference.lif(x, beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0,
                                   reset="hard", surrogate="atan", surrogate_alpha=2.0)
  c0, got, v = jax.jit(lambda p, t: fm.module(p).encode(t))(params, toks)
  np.testing.assert_allclose(c0, x, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_allclose(v, v_last, atol=1e-5)
  assert 0 < float(want.mean()) < 1
  # the model's aux reports this encoder's rate
  _, _, aux = _fwd(fm)(params, toks)
  assert float(aux["encoder_spike_rate"]) == pytest.approx(float(want.mean()), abs=1e-6)
  assert float(aux["layer_spike_rate"][0]) == pytest.approx(float(want.mean()), abs=1e-6)


def test_heaviside_surrogate_and_topk_straight_through():
  z = jnp.array([-1.0, -0.1, 0.0, 0.3])
  np.testing.assert_array_equal(heaviside(z), [0, 0, 1, 1])
  g = jax.grad(lambda z: jnp.sum(heaviside(z) * jnp.arange(4.0)))(z)
  np.testing.assert_allclose(g, jnp.arange(4.0) / (1 + (2 * z) ** 2), rtol=1e-6)
  x = jnp.array([[0.1, -3.0, 2.0, 0.5, -0.2]])
  np.testing.assert_array_equal(topk_mask(x, 2), [[0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(topk_mask(x, 2) * 3.0))(x),
                                jnp.full_like(x, 3.0))


# --------------------------------------------------------------- carried-state decoding

@pytest.mark.parametrize("threshold", [1.0, 2.0])   # 2.0: many silent tokens and keys
def test_decode_token_by_token_equals_full_forward(threshold):
  cfg = tiny(threshold=threshold)
  fm = build(cfg)
  params = fm.init(jax.random.key(0))
  toks = tokens(s=12)
  full, _, aux = _fwd(fm)(params, toks)
  if threshold == 2.0:  # the spike masks really are exercised
    assert 0 < float(aux["layer_active_fraction"].min()) < 1, aux["layer_active_fraction"]
  step = _cached(fm)
  cache = fm.init_cache(2, 16)
  outs = []
  for t in range(toks.shape[1]):
    logits, cache = step(params, toks[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
  assert cache["lengths"].tolist() == [12, 12]
  assert set(cache) == {"lengths", "v_mem", "h", "k", "v", "spike"}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_chunked_forward_with_carried_state_equals_one_pass(scan_layers):
  cfg = tiny(scan_layers=scan_layers, threshold=1.5)
  fm = build(cfg)
  params = fm.init(jax.random.key(0))
  toks = tokens(s=14)
  full, _, _ = _fwd(fm)(params, toks)
  cache = fm.init_cache(2, 14)
  step = _cached(fm)
  a, cache = step(params, toks[:, :9], cache)
  b, cache = step(params, toks[:, 9:], cache)
  np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, atol=2e-5, rtol=2e-5)


def test_generate_greedy_matches_recomputed_argmax():
  from jaxlm.generate import Sampling, generate
  fm = build(tiny())
  params = fm.init(jax.random.key(0))
  prompt = tokens(s=5)
  new = generate(fm, params, prompt, jax.random.key(0), max_new_tokens=6,
                 sampling=Sampling(temperature=0.0))
  seq = jnp.concatenate([prompt, new], 1)
  full, _, _ = jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))(params, seq)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(jnp.argmax(full[:, 4:-1], -1)))


def test_segment_ids_isolate_documents_in_decay_and_attention():
  """Decay state and attention restart at a segment start, so with a stateless encoder (top-k)
  and no anchors, document 2 packed after document 1 gets the logits it gets alone."""
  fm = build(tiny(encoder="topk", n_anchors=0))
  params = fm.init(jax.random.key(0))
  toks = tokens(b=1, s=14)
  seg = jnp.asarray([[1] * 6 + [2] * 8], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8))], jnp.int32)
  packed, _ = jax.jit(lambda p, t: fm.apply(p, t, segment_ids=seg, positions=pos))(params, toks)
  alone, _ = jax.jit(lambda p, t: fm.apply(p, t))(params, toks[:, 6:])
  np.testing.assert_allclose(packed[:, 6:], alone, atol=2e-5, rtol=2e-5)
  joined, _ = jax.jit(lambda p, t: fm.apply(p, t, positions=pos))(params, toks)
  assert not np.allclose(joined[:, 6:], alone, atol=1e-4)       # without segments it leaks


# ------------------------------------------------------------------------- ablations

def _restrict(params, shapes, extra=None):
  """params' leaves at the paths of `shapes` (a model variant's layout); `extra` fills gaps."""
  extra = extra or {}
  return {k: (_restrict(params.get(k, {}), v, extra.get(k)) if isinstance(v, dict)
              else (params[k] if k in params else extra[k])) for k, v in shapes.items()}


def _with(params, **leaves):
  out = jax.tree.map(lambda x: x, params)
  for path, value in leaves.items():
    node = out
    *head, last = path.split("/")
    for k in head:
      node = node[k]
    node[last] = value
  return out


class TestAblations:
  def test_mixer_switch_equals_gate_extremes(self):
    """mixer=decay == dual with g -> 0; mixer=attention == dual with g -> 1 (shared params)."""
    toks = tokens(s=10)
    fm = build(tiny())
    params = fm.init(jax.random.key(0))
    full, _, _ = _fwd(fm)(params, toks)
    for mixer, gate, gone in (("decay", -1e4, ("wq", "wk", "wv", "gate")),
                              ("attention", 1e4, ("w_tcam", "decay_raw", "gate"))):
      fm_m = build(tiny(mixer=mixer))
      assert not set(gone) & set(fm_m.param_shapes["blocks"]["tcam"])
      p_m = _restrict(params, fm_m.param_shapes)
      got, _, _ = _fwd(fm_m)(p_m, toks)
      want, _, _ = _fwd(fm)(_with(params, **{"blocks/tcam/gate": jnp.full((2,), gate)}), toks)
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
      assert not np.allclose(got, full, atol=1e-3)          # the switch changes the model

  def test_static_prior_head(self):
    toks = tokens(s=8)
    fm_d, fm_s = build(tiny()), build(tiny(head="static_prior"))
    pd = fm_d.init(jax.random.key(0))
    ps = _restrict(pd, fm_s.param_shapes, {"prior_bias": jnp.zeros((64,))})
    assert "prior_w1" not in ps and "prior_bias" not in pd
    assert float(pd["prior_weight"]) == pytest.approx(0.1)
    bias = jax.random.normal(jax.random.key(5), (64,))
    zero, _, _ = _fwd(fm_s)(ps, toks)
    shifted, _, _ = _fwd(fm_s)(dict(ps, prior_bias=bias), toks)
    np.testing.assert_allclose(shifted - zero, jnp.broadcast_to(bias, zero.shape), atol=1e-5)
    # dynamic head with w_p = 0 is the static head with a zero bias; w_p = 0.1 differs
    no_prior, _, _ = _fwd(fm_d)(dict(pd, prior_weight=jnp.zeros(())), toks)
    np.testing.assert_allclose(no_prior, zero, atol=1e-6)
    with_prior, _, _ = _fwd(fm_d)(pd, toks)
    assert not np.allclose(with_prior, zero, atol=1e-4)

  def test_topk_encoder_matched_sparsity_and_gradient(self):
    fm = build(tiny(encoder="topk"))
    params = fm.init(jax.random.key(0))
    toks = tokens(s=8)
    _, _, aux = _fwd(fm)(params, toks)
    k = int(0.11 * 32)
    assert float(aux["encoder_spike_rate"]) == pytest.approx(k / 32)
    assert "v_mem" not in fm.init_cache(2, 8)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(fm.apply(p, toks)[0] ** 2)))(params)
    assert float(jnp.abs(grads["embed"]["embedding"]).max()) > 0

  @pytest.mark.parametrize("spiking", [{}, {"mixer": "decay"}, {"mixer": "attention"},
                                       {"head": "static_prior"}, {"encoder": "topk"}])
  def test_every_param_has_logical_axes(self, spiking):
    fm = build(tiny(**spiking))
    shapes = jax.tree.leaves(fm.param_shapes)
    axes = jax.tree.leaves(fm.logical_axes, is_leaf=lambda x: type(x) is tuple)
    assert len(shapes) == len(axes)
    for s, ax in zip(shapes, axes):
      assert len(ax) == s.ndim and all(a in RULES for a in ax), (s, ax)
    cache = jax.eval_shape(lambda: fm.init_cache(2, 8))
    for k, ax in fm.cache_axes.items():
      assert len(ax) == cache[k].ndim, k


# ---------------------------------------------------------------------- configs / presets

def test_presets_param_counts_and_fields():
  want = {"symboliclight_194m": 194.0, "symboliclight_194m_static_prior": 184.7,
          "symboliclight_194m_no_attn": 172.8, "symboliclight_194m_decay_only": 163.5,
          "symboliclight_194m_topk": 194.0}
  for name, millions in want.items():
    cfg = validate(configs.get_preset(name))
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.resolved_head_dim, m.d_ff,
            m.spiking.window, m.spiking.n_anchors) == (48000, 768, 12, 12, 64, 4096, 256, 4)
    assert build(m).num_params() / 1e6 == pytest.approx(millions, abs=0.1), name
  validate(configs.get_preset("tiny_symboliclight_cpu"))


@pytest.mark.parametrize("override,field", [
    ("model.spiking.mixer=both", "model.spiking.mixer"),
    ("model.spiking.encoder=rate", "model.spiking.encoder"),
    ("model.spiking.head=none", "model.spiking.head"),
    ("model.spiking.window=0", "model.spiking.window"),
    ("model.spiking.topk_fraction=0", "model.spiking.topk_fraction"),
    ("model.spiking.v_clamp=0.5", "model.spiking.v_clamp"),
    ("model.spiking.surrogate=relu", "model.spiking.surrogate"),
    ("model.moe.kind=vanilla", "model.moe.kind"),
    ("model.attention.kind=sliding", "model.attention.window"),
    ("model.kind=rnn", "model.kind"),
])
def test_config_errors_name_the_field(override, field):
  with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}"):
    apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), [override])


# -------------------------------------------------------------------------- training

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
        "was the season of Light, it was the season of Darkness, it was the spring of hope.")


def test_tiny_symboliclight_trains_and_reports_spike_rates():
  from jaxlm.train.optimizer import make_optimizer
  from jaxlm.train.state import TrainState
  from jaxlm.train.step import train_step
  base = configs.get_preset("tiny_symboliclight_cpu")
  model = dataclasses.replace(base.model, vocab_size=260, d_model=64, d_ff=128, n_heads=2,
                              n_kv_heads=2, n_layers=2, max_seq_len=64)
  cfg = dataclasses.replace(base, model=model, train=TrainConfig(
      steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3))
  validate(cfg)
  fm = build(cfg.model)
  tx = make_optimizer(cfg.train)
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
  win = np.stack([data[s:s + 33] for s in np.arange(8) * 20])
  batch = {"inputs": jnp.asarray(win[:, :-1]), "targets": jnp.asarray(win[:, 1:])}
  params = fm.init(jax.random.key(0))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jnp.zeros((2,), jnp.uint32))
  step = jax.jit(functools.partial(train_step, fm=fm, cfg=cfg, tx=tx))
  losses, first = [], None
  for i in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    first = first or m
  print("symboliclight tiny losses", losses[0], losses[-1], "spike rate",
        float(m["spiking/encoder_spike_rate"]), np.asarray(m["spiking/layer_spike_rate"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 1.0, losses
  for key in ("spiking/encoder_spike_rate", "spiking/spike_rate", "spiking/ffn_spike_rate"):
    assert 0 < float(m[key]) < 1, (key, m[key])
  assert m["spiking/layer_spike_rate"].shape == (2,)
  assert float(m["spiking/activation_sparsity"]) == pytest.approx(
      1 - float(m["spiking/encoder_spike_rate"]), abs=1e-6)
  # every parameter, the decay rates, gates and prior weight included, gets trained
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()) > 0, params, state.params)
  assert all(jax.tree.leaves(moved)), moved


@pytest.mark.parametrize("tie", [False, True])
def test_dynamic_prior_head_is_the_papers_sum(tie):
  """to_logits = W_out c + w_p W2 GELU(W1 c) (the untied head runs it as one GEMM over the
  joined contraction [c, w_p h] @ [W_out; W2]), against the formula in float32 numpy."""
  cfg = dataclasses.replace(tiny(), tie_embeddings=tie)
  model = sl.SymbolicLight(cfg, rngs=nnx.Rngs(params=3))
  model.prior_weight.value = jnp.asarray(0.7, model.prior_weight.value.dtype)
  x = jax.random.normal(jax.random.key(4), (2, 5, cfg.d_model), jnp.float32)
  got = np.asarray(model.to_logits(x))
  xn = np.asarray(x, np.float64)
  h = xn @ np.asarray(model.prior_w1.value, np.float64)
  h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False), np.float64)
  w_out = (np.asarray(model.embed.embedding.value, np.float64).T if tie
           else np.asarray(model.head.value, np.float64))
  want = xn @ w_out + 0.7 * h @ np.asarray(model.prior_w2.value, np.float64)
  assert got.shape == (2, 5, cfg.vocab_size) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
