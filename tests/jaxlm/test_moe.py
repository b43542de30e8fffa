"""MoE family: dropless dispatch, capacity, routers, losses, pools, MoE++, EP, training."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import configs
from jaxlm.config import (Config, ConfigError, MeshConfig, ModelConfig, MoEConfig, TrainConfig,
                          validate)
from jaxlm.layers import expert_pool, moe_losses, routers
from jaxlm.layers.moe import MoEFFN, capacity, capacity_drop
from jaxlm.models.functional import build
from jaxlm.sharding import make_mesh, use_mesh
from tests.jaxlm.jaxpr_walk import all_eqns
from tests.ops.op_testing import assert_close

F32 = jnp.float32


def _swiglu(x, wg, wu, wd):
  hp = jax.lax.Precision.HIGHEST
  g = jnp.dot(x, wg, precision=hp)
  u = jnp.dot(x, wu, precision=hp)
  return jnp.dot(jax.nn.silu(g) * u, wd, precision=hp)


def dense_reference(x, ids, gates, experts, n_ffn):
  """Loop over experts: every expert on every token, masked by the routing."""
  out = jnp.zeros_like(x)
  for e in range(n_ffn):
    w = jnp.sum(jnp.where(ids == e, gates, 0.0), axis=-1)
    out = out + w[:, None] * _swiglu(x, experts["w_gate"][e], experts["w_up"][e],
                                     experts["w_down"][e])
  return out


def _experts(key, n, d, f, scale=0.3):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w_gate": scale * jax.random.normal(k1, (n, d, f), F32),
          "w_up": scale * jax.random.normal(k2, (n, d, f), F32),
          "w_down": scale * jax.random.normal(k3, (n, f, d), F32)}


def _routing(key, t, n, k):
  k1, k2 = jax.random.split(key)
  logits = jax.random.normal(k1, (t, n), F32)
  gates, ids = jax.lax.top_k(jax.nn.softmax(logits), k)
  return ids.astype(jnp.int32), gates


def _model_cfg(**moe_kw):
  moe = MoEConfig(**{"kind": "unipool", "n_experts": 8, "top_k": 2, "router": "norm_router",
                     **moe_kw})
  return ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=48,
                     max_seq_len=64, dtype="float32", moe=moe)


# ----------------------------------------------------------------------------- dispatch

class TestDropless:
  T, D, F, E, K = 40, 16, 24, 5, 2

  def test_forward_and_grads_match_dense_loop(self):
    kx, ke, kr = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (self.T, self.D), F32)
    experts = _experts(ke, self.E, self.D, self.F)
    ids, gates = _routing(kr, self.T, self.E, self.K)
    out = jax.jit(expert_pool.dispatch, static_argnums=4)(x, ids, gates, experts, self.E)
    ref = dense_reference(x, ids, gates, experts, self.E)
    assert_close(out, ref, F32)

    def loss(fn, x, gates, experts):
      return jnp.sum(jnp.sin(fn(x, ids, gates, experts, self.E)))
    g_out = jax.jit(jax.grad(functools.partial(loss, expert_pool.dispatch), argnums=(0, 1, 2)))(
        x, gates, experts)
    g_ref = jax.jit(jax.grad(functools.partial(loss, dense_reference), argnums=(0, 1, 2)))(
        x, gates, experts)
    for name, a, b in zip(("x", "gates", "experts"), g_out, g_ref):
      for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert_close(la, lb, F32, grad=True, name=f"d{name}")

  @pytest.mark.parametrize("align", [4, 16])
  def test_group_align_matches_dense_loop(self, align):
    """Experts' rows at multiples of `align` in a zero-padded copy (MoEConfig.group_align):
    same output and gradients as the dense loop, dropped slots included."""
    kx, ke, kr = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (self.T, self.D), F32)
    experts = _experts(ke, self.E, self.D, self.F)
    ids, gates = _routing(kr, self.T, self.E, self.K)
    ids = ids.at[5, 1].set(-1).at[11, 0].set(-1)
    fn = lambda x, ids, gates, experts, n: expert_pool.dispatch(x, ids, gates, experts, n,
                                                                group_align=align)
    assert_close(jax.jit(fn, static_argnums=4)(x, ids, gates, experts, self.E),
                 dense_reference(x, ids, gates, experts, self.E), F32)

    def loss(f, x, gates, experts):
      return jnp.sum(jnp.sin(f(x, ids, gates, experts, self.E)))
    g_out = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(x, gates, experts)
    g_ref = jax.grad(functools.partial(loss, dense_reference), argnums=(0, 1, 2))(
        x, gates, experts)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
      assert_close(a, b, F32, grad=True)

  def test_empty_expert_and_minus_one_ids(self):
    x = jax.random.normal(jax.random.key(1), (6, self.D), F32)
    experts = _experts(jax.random.key(2), 4, self.D, self.F)
    ids = jnp.array([[0, -1], [2, 0], [2, -1], [0, 2], [-1, -1], [2, 0]], jnp.int32)  # 1,3 empty
    gates = jnp.full((6, 2), 0.5, F32)
    out = expert_pool.dispatch(x, ids, gates, experts, 4)
    assert_close(out, dense_reference(x, ids, gates, experts, 4), F32)
    np.testing.assert_array_equal(np.asarray(out[4]), 0.0)

  def test_layer_matches_reference_with_router_and_shared(self):
    cfg = dataclasses.replace(_model_cfg(), moe=MoEConfig(
        kind="vanilla", n_experts=4, top_k=2, router="softmax_topk", n_shared_experts=1))
    from flax import nnx
    layer = MoEFFN(cfg, rngs=nnx.Rngs(params=0))
    experts = _experts(jax.random.key(3), 4, cfg.d_model, cfg.d_ff, scale=0.2)
    x = jax.random.normal(jax.random.key(4), (2, 8, cfg.d_model), F32)
    graphdef, state = nnx.split(layer)

    def run(state, x, experts):
      y, _, stats = nnx.merge(graphdef, state)(x, experts)
      return y, stats

    def ref(state, x, experts):
      lay = nnx.merge(graphdef, state)
      x2 = x.reshape(-1, cfg.d_model)
      r = lay.router(x2)
      y = dense_reference(x2, r.ids, r.gates, experts, 4).reshape(x.shape)
      return y + lay.shared(x)

    y, stats = jax.jit(run)(state, x, experts)
    assert_close(y, jax.jit(ref)(state, x, experts), F32)
    f = lambda fn: jax.grad(lambda s, x, e: jnp.sum(jnp.sin(fn(s, x, e) if fn is ref
                                                              else fn(s, x, e)[0])),
                            argnums=(0, 1, 2))
    ga, gb = jax.jit(f(run))(state, x, experts), jax.jit(f(ref))(state, x, experts)
    for la, lb in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
      assert_close(la, lb, F32, grad=True)
    assert float(jnp.sum(stats["load"])) == pytest.approx(1.0)


class TestCapacity:
  def test_drops_tokens_past_capacity_in_token_order(self):
    ids = jnp.array([[0], [0], [0], [1], [0], [1]], jnp.int32)
    kept = capacity_drop(ids, 2, 2)
    np.testing.assert_array_equal(np.asarray(kept[:, 0]), [0, 0, -1, 1, -1, 1])

  def test_first_choices_have_priority(self):
    ids = jnp.array([[1, 0], [0, 1], [0, 1]], jnp.int32)  # expert 0: t1, t2 first; t0 second
    kept = capacity_drop(ids, 2, 2)
    np.testing.assert_array_equal(np.asarray(kept), [[1, -1], [0, 1], [0, -1]])

  def test_non_ffn_ids_never_dropped_and_capacity_formula(self):
    ids = jnp.array([[3], [3], [3]], jnp.int32)  # MoE++ expert id past the 2 FFN experts
    np.testing.assert_array_equal(np.asarray(capacity_drop(ids, 2, 1)), np.asarray(ids))
    assert capacity(100, 2, 8, 1.25) == 32

  def test_layer_output_zero_for_dropped_tokens(self):
    from flax import nnx
    cfg = dataclasses.replace(_model_cfg(), moe=MoEConfig(
        kind="vanilla", n_experts=2, top_k=1, router="softmax_topk", renormalize=False,
        capacity_factor=0.5))
    layer = MoEFFN(cfg, rngs=nnx.Rngs(params=0))
    # make every token choose expert 0: capacity = ceil(0.5 * 8 / 2) = 2 keeps tokens 0, 1
    layer.router.w.value = jnp.zeros_like(layer.router.w.value).at[:, 0].set(1.0)
    x = jnp.abs(jax.random.normal(jax.random.key(5), (1, 8, cfg.d_model), F32))
    experts = _experts(jax.random.key(6), 2, cfg.d_model, cfg.d_ff)
    graphdef, state = nnx.split(layer)
    y, _, stats = jax.jit(lambda s, x, e: nnx.merge(graphdef, s)(x, experts))(state, x, experts)
    x2 = x[0]
    r = layer.router(x2)
    np.testing.assert_array_equal(np.asarray(r.ids[:, 0]), 0)
    full = dense_reference(x2, r.ids, r.gates, experts, 2)
    assert_close(y[0, :2], full[:2], F32)
    np.testing.assert_array_equal(np.asarray(y[0, 2:]), 0.0)
    assert float(stats["dropped"]) == pytest.approx(6 / 8)


# ----------------------------------------------------------------------------- routers

class TestRouters:
  def test_norm_router_constant_matches_fresh_monte_carlo(self):
    for m, k in ((16, 1), (24, 2), (64, 1)):
      c = routers.norm_router_constant(m, k)
      rng = np.random.default_rng(12345)
      u = rng.standard_normal((40000, m))
      top = np.sort(np.maximum(u, 0), axis=1)[:, ::-1][:, :k]
      den = np.linalg.norm(top, axis=1)
      fresh = np.mean(np.linalg.norm(u, axis=1)[den > 0] / den[den > 0])
      assert c == pytest.approx(fresh, rel=0.02), (m, k)
      assert routers.norm_router_constant(m, k) == c  # deterministic

  def test_norm_router_gates_not_renormalised(self):
    z = jax.random.normal(jax.random.key(0), (32, 8), F32)
    c = routers.norm_router_constant(8, 2)
    r = routers.route("norm_router", z, 2, sigma=jnp.float32(1.5), c=c)
    s = 1.5 * c * jax.nn.relu(z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8))
    np.testing.assert_allclose(np.asarray(r.scores), np.asarray(s), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.gates),
                               np.asarray(jnp.take_along_axis(s, r.ids, axis=-1)), rtol=1e-6)
    assert not np.allclose(np.asarray(jnp.sum(r.gates, -1)), 1.0)

  def test_norm_router_masked_experts_zeroed_before_norm(self):
    z = jnp.array([[3.0, 4.0, 100.0, -1.0]], F32)
    mask = jnp.array([True, True, False, True])
    r = routers.route("norm_router", z, 1, sigma=jnp.float32(1.0), c=2.0, expert_mask=mask)
    np.testing.assert_allclose(np.asarray(r.scores[0]),
                               [2 * 3 / np.sqrt(26), 2 * 4 / np.sqrt(26), 0, 0], rtol=1e-6)
    assert int(r.ids[0, 0]) == 1

  def test_ties_deterministic_lowest_index(self):
    z = jnp.ones((4, 6), F32)
    for kind, kw in (("softmax_topk", {}), ("norm_router", dict(sigma=jnp.float32(1), c=1.0))):
      r1 = routers.route(kind, z, 3, **kw)
      r2 = jax.jit(lambda z: routers.route(kind, z, 3, **kw))(z)
      np.testing.assert_array_equal(np.asarray(r1.ids), [[0, 1, 2]] * 4)
      np.testing.assert_array_equal(np.asarray(r1.ids), np.asarray(r2.ids))

  def test_softmax_renormalise_option(self):
    z = jax.random.normal(jax.random.key(1), (10, 6), F32)
    a = routers.route("softmax_topk", z, 2, renormalize=True)
    b = routers.route("softmax_topk", z, 2, renormalize=False)
    np.testing.assert_allclose(np.asarray(jnp.sum(a.gates, -1)), 1.0, rtol=1e-6)
    p = jax.nn.softmax(z)
    np.testing.assert_allclose(np.asarray(b.gates),
                               np.asarray(jnp.take_along_axis(p, b.ids, -1)), rtol=1e-6)

  def test_relu_rmsnorm_variable_experts(self):
    z = jnp.array([[1.0, -1.0, 2.0, -3.0], [-1.0, -1.0, -1.0, 0.5]], F32)
    r = routers.route("relu_rmsnorm", z, 4, scale=jnp.ones((4,)), norm_eps=1e-6)
    np.testing.assert_array_equal(np.asarray(r.ids), [[2, 0, -1, -1], [3, -1, -1, -1]])
    rr = jax.nn.relu(z)
    s = rr / jnp.sqrt(jnp.mean(rr * rr, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(r.scores), np.asarray(s), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.gates[0, :2]), np.asarray(s[0, [2, 0]]), rtol=1e-5)
    assert float(r.gates[0, 2]) == 0.0


# ----------------------------------------------------------------------------- losses

class TestLosses:
  def test_pool_balance_loss_formula(self):
    # 4 layers, 2 pools of 3 experts; layers (0, 1) share pool 0, (2, 3) pool 1.
    load = np.array([[1, 0, 0], [0.5, 0.5, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    prob = np.array([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]],
                    np.float32)
    loss, fbar, pbar = moe_losses.pool_balance(jnp.asarray(load), jnp.asarray(prob), 2)
    f0, p0 = load[:2].mean(0), prob[:2].mean(0)
    f1, p1 = load[2:].mean(0), prob[2:].mean(0)
    want = 0.5 * (3 * np.sum(f0 * p0) + 3 * np.sum(f1 * p1))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(np.asarray(fbar), [f0, f1], rtol=1e-6)
    # gradient only through Pbar: d loss / d prob[l, i] = M * fbar_i / (layers per pool) / pools
    g_load, g_prob = jax.grad(lambda a, b: moe_losses.pool_balance(a, b, 2)[0],
                              argnums=(0, 1))(jnp.asarray(load), jnp.asarray(prob))
    np.testing.assert_array_equal(np.asarray(g_load), 0.0)
    np.testing.assert_allclose(np.asarray(g_prob),
                               np.stack([f0, f0, f1, f1]) * 3 / 2 / 2, rtol=1e-6)

  def test_layer_stats_and_model_aux(self):
    ids = jnp.array([[0], [0], [1], [2]], jnp.int32)
    scores = jnp.array([[0.7, 0.2, 0.1]] * 4, F32)
    rt = routers.Routing(jnp.log(scores), scores, ids, jnp.take_along_axis(scores, ids, -1))
    moe = MoEConfig(kind="vanilla", n_experts=3, balance_loss=0.1, pool_balance_loss=0.2,
                    router_z_loss=0.3)
    st = moe_losses.layer_stats(rt, ids, (1, 4), moe)
    np.testing.assert_allclose(np.asarray(st["load"]), [0.5, 0.25, 0.25])
    assert float(st["balance"]) == pytest.approx(3 * (0.5 * 0.7 + 0.25 * 0.2 + 0.25 * 0.1))
    aux = moe_losses.model_aux(jax.tree.map(lambda a: a[None], st), moe, 1)
    want = 0.1 * aux["balance_loss"] + 0.2 * aux["pool_balance_loss"] + 0.3 * aux["router_z_loss"]
    assert float(aux["aux_loss"]) == pytest.approx(float(want), rel=1e-6)

  def test_blockffn_losses(self):
    s = jnp.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]], F32)  # [b=1, s=3, E=2]
    p = np.asarray(s) / np.asarray(s).sum(-1, keepdims=True)
    keep = np.prod(1 - np.pad(p, ((0, 0), (0, 1), (0, 0))).reshape(1, 2, 2, 2), axis=2)
    assert float(moe_losses.chunk_sparsity_loss(s, 2)) == pytest.approx(1 - keep.mean(), rel=1e-6)
    tgt = np.array([[1.0, 0.0], [0.0, 1.0]])
    pred = 1 / (1 + np.exp(-2.0 * np.asarray(s)[0, 1:]))
    bce = -(tgt * np.log(pred) + (1 - tgt) * np.log(1 - pred)).mean()
    assert float(moe_losses.locality_loss(s, 2.0)) == pytest.approx(bce, rel=1e-5)


# ----------------------------------------------------------------------------- pools

def _expert_param_count(fm):
  shapes, axes = fm.param_shapes, fm.logical_axes
  leaves = jax.tree.leaves(shapes)
  ax = jax.tree.leaves(axes, is_leaf=lambda x: type(x) is tuple)
  return sum(int(s.size) for s, a in zip(leaves, ax) if "expert" in a)


class TestPools:
  @pytest.mark.parametrize("scan", [True, False])
  def test_unipool_holds_exactly_m_experts(self, scan):
    cfg = dataclasses.replace(_model_cfg(n_experts=8), scan_layers=scan)
    fm = build(cfg)
    per_expert = 3 * cfg.d_model * cfg.d_ff
    assert _expert_param_count(fm) == 8 * per_expert
    assert fm.param_shapes["pool"]["w_gate"].shape == (1, 8, cfg.d_model, cfg.d_ff)
    pool_size = sum(int(a.size) for a in jax.tree.leaves(fm.param_shapes["pool"]))
    assert pool_size == 8 * per_expert  # every expert param lives in the one pool

  @pytest.mark.parametrize("scan", [True, False])
  def test_grouped_and_vanilla_pool_sizes(self, scan):
    cfg = dataclasses.replace(_model_cfg(n_experts=8, n_groups=2), scan_layers=scan)
    assert _expert_param_count(build(cfg)) == 2 * 8 * 3 * cfg.d_model * cfg.d_ff
    van = dataclasses.replace(cfg, moe=MoEConfig(kind="vanilla", n_experts=3, top_k=1))
    assert _expert_param_count(build(van)) == 4 * 3 * 3 * cfg.d_model * cfg.d_ff

  def test_scanned_equals_unscanned_and_pool_assignment(self):
    cfg = _model_cfg(n_experts=4, n_groups=2, gating_residual=True, router="softmax_topk")
    fs, fu = build(cfg), build(dataclasses.replace(cfg, scan_layers=False))
    params = fs.init(jax.random.key(0))
    unstacked = dict(params)
    unstacked["blocks"] = {i: jax.tree.map(lambda a: a[i], params["blocks"])
                           for i in range(cfg.n_layers)}
    toks = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    fwd = lambda fm: jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))
    ls, _, auxs = fwd(fs)(params, toks)
    lu, _, auxu = fwd(fu)(unstacked, toks)
    assert_close(ls, lu, F32)
    assert_close(auxs["layer_load"], auxu["layer_load"], F32)
    # pool 1 (layers 2, 3) does not affect the first two layers' routing
    p2 = dict(params, pool=jax.tree.map(lambda a: a.at[1].multiply(3.0), params["pool"]))
    _, _, aux2 = fwd(fs)(p2, toks)
    np.testing.assert_array_equal(np.asarray(aux2["layer_load"][:2]),
                                  np.asarray(auxs["layer_load"][:2]))

  def test_dense_model_unchanged_api(self):
    cfg = dataclasses.replace(_model_cfg(), moe=MoEConfig())
    fm = build(cfg)
    params = fm.init(jax.random.key(0))
    assert "pool" not in params and "mlp" in params["blocks"]
    toks = jnp.zeros((1, 4), jnp.int32)
    out = jax.jit(fm.apply)(params, toks)
    assert len(out) == 2
    logits, cache, aux = jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))(params, toks)
    assert aux == {} and cache is None
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(out[0]))


# ----------------------------------------------------------------------------- MoE++

class TestMoEPlusPlus:
  def test_zero_copy_constant_experts(self):
    t, d, c = 5, 6, 2
    x = jax.random.normal(jax.random.key(0), (t, d), F32)
    experts = {"const_w": jax.random.normal(jax.random.key(1), (c, d, 2), F32),
               "const_v": jax.random.normal(jax.random.key(2), (c, d), F32)}
    # 3 FFN experts, then zero (3), copy (4), constant (5, 6)
    ids = jnp.array([[3, 0], [4, 1], [5, 4], [6, 3], [0, 1]], jnp.int32)
    gates = jnp.array([[0.3, 0.7], [0.6, 0.4], [0.5, 0.25], [0.9, 0.1], [0.5, 0.5]], F32)
    out = jax.jit(expert_pool.extra_experts, static_argnums=(4, 5, 6, 7))(
        x, ids, gates, experts, 3, 1, 1, c)
    a = jax.nn.softmax(jnp.einsum("td,cdo->tco", x, experts["const_w"]), -1)
    const = lambda tok, j: a[tok, j, 0] * x[tok] + a[tok, j, 1] * experts["const_v"][j]
    want = np.stack([np.zeros(d), 0.6 * x[1], 0.5 * const(2, 0) + 0.25 * x[2],
                     0.9 * const(3, 1), np.zeros(d)])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    # the FFN dispatch ignores the non-FFN ids
    ffn = _experts(jax.random.key(3), 3, d, 4)
    assert_close(jax.jit(expert_pool.dispatch, static_argnums=4)(x, ids, gates, ffn, 3),
                 dense_reference(x, ids, gates, ffn, 3), F32)

  def test_gating_residual_uses_previous_layer_logits(self):
    from flax import nnx
    cfg = _model_cfg(n_experts=4, router="softmax_topk", gating_residual=True,
                     n_zero_experts=1, n_copy_experts=1, n_constant_experts=1)
    cfg = dataclasses.replace(cfg, scan_layers=False)
    fm = build(cfg)
    params = fm.init(jax.random.key(0))
    params["blocks"] = {i: dict(b, moe=dict(b["moe"], router=dict(
        b["moe"]["router"], g=0.5 * jax.random.normal(jax.random.key(10 + i), (7, 7)))))
        for i, b in params["blocks"].items()}
    model = fm.module(params)
    toks = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    logits, _, aux = model(toks, return_aux=True)
    # manual unroll: layer l's router sees W_l x + G_l logits_{l-1} (zeros before layer 0)
    x = model.embed(toks, F32)
    pos = jnp.broadcast_to(jnp.arange(8)[None], (2, 8))
    prev = jnp.zeros((2, 8, 7), F32)
    pools = model.pool.arrays()
    for i, blk in enumerate(model.blocks):
      h, _ = blk.attn(blk.attn_norm(x), pos)
      x = x + h
      xn = blk.mlp_norm(x).reshape(16, -1)
      r = blk.moe.router.w.value
      want = xn @ r + prev.reshape(16, 7) @ blk.moe.router.g.value
      x, _, got, _ = blk.moe_call(x - h, pos, None, None, jax.tree.map(lambda a: a[0], pools),
                                  prev)
      np.testing.assert_allclose(np.asarray(got.reshape(16, 7)), np.asarray(want),
                                 rtol=1e-4, atol=1e-5)
      prev = got
    assert_close(model.to_logits(x), logits, F32)


# ----------------------------------------------------------------------------- config

class TestConfig:
  def _cfg(self, **moe):
    return Config(model=dataclasses.replace(_model_cfg(), moe=MoEConfig(**moe)))

  @pytest.mark.parametrize("moe,field", [
      (dict(kind="vanilla", n_experts=4, top_k=5), "model.moe.top_k"),
      (dict(kind="unipool", n_experts=2, top_k=3), "model.moe.n_experts"),
      (dict(kind="unipool", n_experts=8, n_groups=3), "model.moe.n_groups"),
      (dict(kind="vanilla", n_groups=2), "model.moe.n_groups"),
      (dict(kind="moe"), "model.moe.kind"),
      (dict(kind="vanilla", router="hash"), "model.moe.router"),
      (dict(kind="vanilla", capacity_factor=-1.0), "model.moe.capacity_factor"),
      (dict(kind="unipool", group_align=-1), "model.moe.group_align"),
      (dict(kind="unipool", pool_grad="later"), "model.moe.pool_grad"),
      (dict(kind="vanilla", pool_grad="deferred"), "model.moe.pool_grad"),
      (dict(kind="unipool", pool_grad="deferred", group_align=128), "model.moe.pool_grad"),
      (dict(kind="unipool", n_groups=2, pool_grad_chunk=4), "model.moe.pool_grad_chunk"),
      (dict(kind="unipool", pool_grad_chunk=3), "model.moe.pool_grad_chunk"),
      (dict(kind="unipool", fsdp_dispatch="split"), "model.moe.fsdp_dispatch"),
  ])
  def test_errors_name_the_field(self, moe, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
      validate(self._cfg(**moe))

  def test_presets(self):
    for name in ("unipool_182m", "unipool_469m", "unipool_650m", "unipool_830m", "unipool_978m",
                 "vanilla_moe_182m", "vanilla_moe_978m", "tiny_unipool_cpu",
                 "tiny_vanilla_moe_cpu"):
      validate(configs.get_preset(name))
    u = configs.get_preset("unipool_830m").model
    assert (u.n_layers, u.d_model, u.moe.n_experts, u.moe.router) == (48, 1024, 384, "norm_router")
    assert configs.get_preset("unipool_182m").model.moe.pool_balance_loss == 0.01
    assert configs.get_preset("unipool_469m").model.moe.pool_balance_loss == 0.02
    v = configs.get_preset("vanilla_moe_469m").model
    assert (v.moe.n_experts, v.moe.top_k, v.moe.balance_loss) == (8, 1, 0.01)


# ----------------------------------------------------------------------------- EP

class TestExpertParallel:
  @pytest.mark.parametrize("align,mesh_kw,mode", [
      (0, dict(data=2, expert=4), "auto"), (4, dict(data=2, expert=4), "auto"),
      # experts also split over d on fsdp: rows move across the fsdp group
      (0, dict(fsdp=2, expert=4), "split_embed"),
      (4, dict(data=2, fsdp=2, expert=2), "split_embed"),
      (0, dict(fsdp=2, expert=4), "gather_weights")])
  def test_eight_devices_equals_one(self, align, mesh_kw, mode):
    assert jax.device_count() >= 8
    t, d, f, e, k = 64, 16, 24, 8, 2
    x = jax.random.normal(jax.random.key(0), (t, d), F32)
    experts = _experts(jax.random.key(1), e, d, f)
    ids, gates = _routing(jax.random.key(2), t, e, k)
    ids = ids.at[3, 1].set(-1)  # a dropped slot
    ref = expert_pool.dispatch(x, ids, gates, experts, e)
    mesh = make_mesh(MeshConfig(**mesh_kw))

    def loss(fn, x, gates, experts):
      return jnp.sum(jnp.sin(fn(x, gates, experts)))

    ep = lambda x, g, w: expert_pool.dispatch_expert_parallel(x, ids, g, w, e, mesh,
                                                              group_align=align,
                                                              fsdp_dispatch=mode)
    one = lambda x, g, w: expert_pool.dispatch(x, ids, g, w, e)
    with use_mesh(mesh):
      out = jax.jit(ep)(x, gates, experts)
      g_ep = jax.jit(jax.grad(functools.partial(loss, ep), argnums=(0, 1, 2)))(x, gates, experts)
    assert_close(out, ref, F32)
    g_one = jax.grad(functools.partial(loss, one), argnums=(0, 1, 2))(x, gates, experts)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_one)):
      assert_close(a, b, F32, grad=True)

  def test_model_forward_on_expert_mesh(self):
    cfg = _model_cfg(n_experts=8, top_k=2)
    fm = build(cfg)
    params = fm.init(jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size)
    ref, _, aux_ref = jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))(params, toks)
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    with use_mesh(mesh):
      out, _, aux = jax.jit(lambda p, t: fm.apply(p, t, return_aux=True))(params, toks)
    assert_close(out, ref, F32)
    assert_close(aux["layer_load"], aux_ref["layer_load"], F32)


class TestFsdpSplitEmbed:
  """Experts left split over d on "fsdp" (moe.fsdp_dispatch=split_embed): the gate / up
  products summed over the axis, tokens over "data" only."""

  @pytest.mark.parametrize("mesh_kw,align", [(dict(data=2, fsdp=4), 0),
                                             (dict(data=2, fsdp=2, tensor=2), 4),
                                             (dict(fsdp=8), 0)])
  def test_equals_one_device(self, mesh_kw, align):
    t, d, f, e, k = 24, 16, 24, 6, 2
    x = jax.random.normal(jax.random.key(0), (t, d), F32)
    experts = _experts(jax.random.key(1), e, d, f)
    ids, gates = _routing(jax.random.key(2), t, e, k)
    ids = ids.at[3, 1].set(-1)  # a dropped slot
    mesh = make_mesh(MeshConfig(**mesh_kw))

    def loss(fn, x, gates, experts):
      return jnp.sum(jnp.sin(fn(x, gates, experts)))

    split = lambda x, g, w: expert_pool.dispatch_data_parallel(
        x, ids, g, w, e, mesh, group_align=align, fsdp_dispatch="split_embed")
    one = lambda x, g, w: expert_pool.dispatch(x, ids, g, w, e)
    with use_mesh(mesh):
      out = jax.jit(split)(x, gates, experts)
      g_split = jax.jit(jax.grad(functools.partial(loss, split), argnums=(0, 1, 2)))(
          x, gates, experts)
    assert_close(out, dense_reference(x, ids, gates, experts, e), F32)
    g_one = jax.grad(functools.partial(loss, one), argnums=(0, 1, 2))(x, gates, experts)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_one)):
      assert_close(a, b, F32, grad=True)

  @staticmethod
  def _gathered_weights(mode: str, t: int) -> bool:
    """Whether the compiled dispatch on fsdp=4 all-gathers the whole w_gate [E, d, f]."""
    d, f, e = 64, 96, 16
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    w_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))
    experts = {n: jax.ShapeDtypeStruct(s, F32, sharding=w_spec)
               for n, s in (("w_gate", (e, d, f)), ("w_up", (e, d, f)))}
    experts["w_down"] = jax.ShapeDtypeStruct(
        (e, f, d), F32,
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp")))
    fn = lambda x, ids, g, w: expert_pool.dispatch_data_parallel(x, ids, g, w, e, mesh,
                                                                 fsdp_dispatch=mode)
    with use_mesh(mesh):
      hlo = jax.jit(fn).lower(jax.ShapeDtypeStruct((t, d), F32),
                              jax.ShapeDtypeStruct((t, 1), jnp.int32),
                              jax.ShapeDtypeStruct((t, 1), F32), experts).compile().as_text()
    return any("all-gather" in line and f"f32[{e},{d},{f}]" in line
               for line in hlo.splitlines())

  def test_decode_does_not_gather_the_pool(self):
    """auto on 8 tokens against 16 experts splits: no all-gather of a whole expert weight,
    which gather_weights (FSDP) does; 4096 tokens gather (they would move more)."""
    assert self._gathered_weights("gather_weights", 8)
    assert not self._gathered_weights("auto", 8)
    assert self._gathered_weights("auto", 4096)

  def test_auto_rule(self):
    # unipool_469m decode (batch 8, pool of 192) splits; vanilla_moe_469m training (16k
    # tokens, 8 experts a layer) gathers; unipool training at 16k tokens moves less split
    assert expert_pool.split_embed_moves_less(8, 8, 1024, 4096, 192)
    assert not expert_pool.split_embed_moves_less(16384, 16384, 1024, 4096, 8)
    assert expert_pool.split_embed_moves_less(16384, 16384, 1024, 4096, 192)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    args = (mesh, 8, 1, 64, 96, 16)
    for deferred in (False, True):
      assert expert_pool.fsdp_split_embed("auto", *args, deferred)
      assert not expert_pool.fsdp_split_embed("gather_weights", *args, deferred)
    # what cannot split: auto gathers, a forced split is refused by name
    for bad, deferred, why in [((8, 1, 66, 96, 16), False, "d_model 66"),
                               ((8, 1, 64, 90, 16), True, "the expert width 90"),
                               ((9, 1, 64, 96, 16), True, "9 tokens")]:
      assert not expert_pool.fsdp_split_embed("auto", mesh, *bad, deferred)
      with pytest.raises(ValueError, match=f"fsdp_dispatch='split_embed': {why}"):
        expert_pool.fsdp_split_embed("split_embed", mesh, *bad, deferred)
    assert expert_pool.fsdp_split_embed("split_embed", mesh, 8, 1, 64, 90, 16, False)
    # with an expert axis: unipool_469m's 96 local experts split, vanilla's 4 gather
    ep_mesh = make_mesh(MeshConfig(fsdp=2, expert=4))
    tok = ("fsdp", "expert")
    assert expert_pool.ep_split_embed("auto", ep_mesh, tok, 8192, 1024, 4096, 96)
    assert not expert_pool.ep_split_embed("auto", ep_mesh, tok, 8192, 1024, 4096, 4)
    assert not expert_pool.ep_split_embed("auto", ep_mesh, ("expert",), 8, 1024, 4096, 96)
    with pytest.raises(ValueError, match="not split over fsdp"):
      expert_pool.ep_split_embed("split_embed", ep_mesh, ("expert",), 8, 1024, 4096, 96)


# ----------------------------------------------------------------------------- training

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
        "was the season of Light, it was the season of Darkness, it was the spring of hope.")


@pytest.mark.parametrize("preset", ["tiny_unipool_cpu", "tiny_vanilla_moe_cpu"])
def test_tiny_moe_trains(preset):
  from jaxlm.train.optimizer import make_optimizer
  from jaxlm.train.state import TrainState
  from jaxlm.train.step import train_step
  base = configs.get_preset(preset)
  model = dataclasses.replace(base.model, vocab_size=260, d_model=64, d_ff=128, n_heads=2,
                              n_kv_heads=1, max_seq_len=64)
  cfg = dataclasses.replace(base, model=model, train=TrainConfig(
      steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3))
  validate(cfg)
  fm = build(cfg.model)
  tx = make_optimizer(cfg.train)
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
  starts = np.arange(8) * 20
  win = np.stack([data[s:s + 33] for s in starts])
  batch = {"inputs": jnp.asarray(win[:, :-1]), "targets": jnp.asarray(win[:, 1:])}
  params = fm.init(jax.random.key(0))
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                     jnp.zeros((2,), jnp.uint32))
  step = jax.jit(functools.partial(train_step, fm=fm, cfg=cfg, tx=tx))
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 1.0, losses
  for key in ("moe/aux_loss", "moe/balance_loss", "moe/pool_balance_loss", "moe/router_z_loss",
              "moe/router_entropy", "moe/dropped_fraction"):
    assert key in m and np.isfinite(float(m[key])), key
  assert m["moe/layer_load"].shape == (4, cfg.model.moe.n_routed)
  np.testing.assert_allclose(np.asarray(m["moe/layer_load"]).sum(-1), 1.0, rtol=1e-5)
  coef = cfg.model.moe
  want = coef.balance_loss * m["moe/balance_loss"] + coef.pool_balance_loss * m[
      "moe/pool_balance_loss"]
  assert float(m["moe/aux_loss"]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_dots_keeps_the_expert_matmuls(capsys, scan):
  """remat="dots" (and "dots_and_acts") save each MoE layer's three grouped-matmul outputs
  (Pallas calls on the GPU, not dots, so checkpoint_dots alone reran them in the backward);
  "full" saves none; gradients are the same, scanned or not."""
  from jax.ad_checkpoint import print_saved_residuals
  counts, grads = {}, {}
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  for remat in ("dots", "dots_and_acts", "full", "dots_only"):
    cfg = dataclasses.replace(_model_cfg(), remat=remat, scan_layers=scan)
    fm = build(cfg)
    params = fm.init(jax.random.key(0))
    loss = lambda p: jnp.mean(fm.apply(p, tokens)[0] ** 2)
    print_saved_residuals(loss, params)
    counts[remat] = capsys.readouterr().out.count("named 'expert_dots'")
    grads[remat] = jax.grad(loss)(params)
  if not scan:   # print_saved_residuals does not name what a scanned body saves
    n = 3 * _model_cfg().n_layers
    assert counts == {"dots": n, "dots_and_acts": n, "full": 0, "dots_only": 0}
  for a, b in zip(jax.tree.leaves(grads["dots"]), jax.tree.leaves(grads["full"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- deferred pool gradient

def _grads(cfg, tokens):
  fm = build(cfg)
  params = fm.init(jax.random.key(0))
  loss = lambda p: jnp.mean(fm.apply(p, tokens)[0] ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan,moe_kw,remat", [
    (True, {}, "dots"),
    (False, {}, "none"),
    # two pools of two layers each; capacity drops rows (sorted past the groups); MoE++
    # constant experts keep their own (autodiff) gradient
    (True, dict(n_groups=2, capacity_factor=0.5, n_constant_experts=1, n_zero_experts=1),
     "full"),
    # deferred per chunk of layers (an outer scan over chunks; unrolled: taps per chunk)
    (True, dict(pool_grad_chunk=2), "dots"),
    (True, dict(n_groups=2, pool_grad_chunk=1), "none"),
    (False, dict(pool_grad_chunk=2), "dots"),
])
def test_deferred_pool_gradient_equals_autodiff(scan, moe_kw, remat):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  base = dataclasses.replace(_model_cfg(**moe_kw), scan_layers=scan, remat=remat)
  validate(Config(model=base, train=TrainConfig(seq_len=16)))
  loss0, g0 = _grads(base, tokens)
  deferred = dataclasses.replace(base, moe=dataclasses.replace(base.moe, pool_grad="deferred"))
  validate(Config(model=deferred, train=TrainConfig(seq_len=16)))
  loss1, g1 = _grads(deferred, tokens)
  assert float(loss1) == float(loss0)
  assert float(jnp.abs(g0["pool"]["w_gate"]).max()) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    scale = float(jnp.abs(a).max()) or 1.0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_pool_gradient_sums_every_layer():
  """pool_gradient over stacked taps = the sum over layers of each layer's own tgmm; rows
  past a layer's groups (dropped assignments) count nowhere."""
  from jaxlm.layers import pool_grad
  import ops.gmm
  n_layers, rows, d, f = 3, 11, 4, 6
  ks = jax.random.split(jax.random.key(0), 6)
  sizes = jnp.array([[2, 0, 3, 1, 4], [0, 0, 0, 0, 9], [1, 1, 1, 1, 1]], jnp.int32)  # <= rows
  taps = {n: jax.random.normal(k, (n_layers, rows, d if w == "d" else f))
          for k, (n, w) in zip(ks, pool_grad.TAP_WIDTHS.items())}
  taps["gs"] = sizes.astype(jnp.float32)
  got = pool_grad.pool_gradient(taps)
  pairs = {"w_gate": ("xs", "dg"), "w_up": ("xs", "du"), "w_down": ("h", "dy")}
  for name, (a, b) in pairs.items():
    want = sum(ops.gmm.tgmm(taps[a][l], taps[b][l], sizes[l], preferred_element_type=jnp.float32)
               for l in range(n_layers))
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(pool_grad.row_experts(sizes, rows))[1],
                                [4] * 9 + [-1] * 2)


def test_deferred_pool_gradient_refuses_tensor_and_expert_axes():
  from jaxlm.config_validate import validate_for_devices
  for mesh in (MeshConfig(data=4, tensor=2), MeshConfig(data=2, expert=4)):
    cfg = Config(model=_model_cfg(pool_grad="deferred"), mesh=mesh,
                 train=TrainConfig(seq_len=16, batch_size=8))
    with pytest.raises(ConfigError, match="^model.moe.pool_grad"):
      validate_for_devices(validate(cfg), 8)
  ok = Config(model=_model_cfg(pool_grad="deferred"), mesh=MeshConfig(data=4, fsdp=2),
              train=TrainConfig(seq_len=16, batch_size=8))
  assert validate_for_devices(validate(ok), 8) == (4, 2, 1, 1)


@pytest.mark.parametrize("mesh_kw,chunk,fsdp_dispatch", [
    (dict(data=8), 0, "auto"), (dict(data=4, fsdp=2), 2, "gather_weights"),
    # the experts split over d: taps by rows over data and by width over fsdp
    (dict(data=4, fsdp=2), 0, "split_embed"), (dict(data=2, fsdp=4), 2, "auto"),
    (dict(fsdp=8), 0, "split_embed")])
def test_deferred_pool_gradient_data_parallel_equals_one_device(mesh_kw, chunk, fsdp_dispatch):
  """On 8 simulated devices (tokens split over data / fsdp, or the experts split over d on
  fsdp) each device contracts its own rows (its own d block) and the pool gradients are
  summed over the row shards: the same gradients as autodiff on one device."""
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  base = dataclasses.replace(_model_cfg(), remat="dots")
  _, g0 = _grads(base, tokens)
  cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, pool_grad="deferred",
                                                          pool_grad_chunk=chunk,
                                                          fsdp_dispatch=fsdp_dispatch))
  with use_mesh(make_mesh(MeshConfig(**mesh_kw))):
    _, g1 = _grads(cfg, tokens)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    scale = float(jnp.abs(a).max()) or 1.0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def _scan_carry_shapes(jaxpr) -> list:
  """Shapes of every scan's loop carries in a jaxpr, nested ones included."""
  out = []
  for eqn, _ in all_eqns(jaxpr):
    if eqn.primitive.name == "scan":
      nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
      out += [v.aval.shape for v in eqn.invars[nc:nc + ncarry]]
  return out


def test_deferred_pool_gradient_has_no_per_layer_pool_accumulator():
  """Autodiff of the scanned layers carries an accumulator of the whole shared pool through
  the backward scan (added to once per layer); deferred, no scan carries anything pool-sized."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  pool_shape = None
  found = {}
  for pg in ("per_layer", "deferred"):
    fm = build(dataclasses.replace(_model_cfg(pool_grad=pg), scan_layers=True))
    params = fm.init(jax.random.key(0))
    pool_shape = params["pool"]["w_gate"].shape
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(fm.apply(p, tokens)[0] ** 2)))(params)
    found[pg] = pool_shape in _scan_carry_shapes(jaxpr.jaxpr)
  assert found == {"per_layer": True, "deferred": False}


def _converts_in_scans(jaxpr) -> list:
  """(input shape, input dtype) of every convert_element_type inside a scan body."""
  return [(e.invars[0].aval.shape, jnp.dtype(e.invars[0].aval.dtype))
          for e, inside in all_eqns(jaxpr)
          if e.primitive.name == "convert_element_type" and "scan" in inside]


def test_pools_are_cast_to_the_compute_dtype_once():
  """Left to the layers, each block casts its (f32) experts to bf16 inside the layer scan: for
  a pool shared by every layer that is the whole pool once per layer (and again wherever the
  remat backward recomputes the forward). The pools are cast once before the scan instead, for
  UniPool's deferred and per-layer pool gradient and for vanilla MoE's per-layer pools: no
  forward scan casts anything expert-shaped. (Forward only: the backward's dead per-layer
  weight gradients of the stop_gradient pool hold expert-shaped converts until XLA drops them.)
  The per-layer gradients of a shared pool still add up in f32: see
  test_deferred_pool_gradient_equals_autodiff and test_compute_copy_gradient_dtype."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  found = {}
  for kind, pg in (("unipool", "per_layer"), ("unipool", "deferred"), ("vanilla", "per_layer")):
    cfg = dataclasses.replace(_model_cfg(kind=kind, pool_grad=pg), scan_layers=True,
                              remat="dots", dtype="bfloat16")
    fm = build(cfg)
    params = fm.init(jax.random.key(0))
    assert params["pool"]["w_gate"].dtype == jnp.float32
    expert_f32 = (params["pool"]["w_gate"].shape[1:], jnp.dtype(jnp.float32))
    jaxpr = jax.make_jaxpr(lambda p: fm.apply(p, tokens)[0])(params)
    found[kind, pg] = expert_f32 in _converts_in_scans(jaxpr.jaxpr)
  assert not any(found.values()), found


def test_compute_copy_gradient_dtype():
  """pool_grad.compute_copy reads the cast copy and sends the whole cotangent to the f32
  original, in f32: summed over uses (as over the layers sharing a pool) in f32."""
  from jaxlm.layers import pool_grad
  w = jax.random.normal(jax.random.key(0), (3, 4), jnp.float32)
  w16 = w.astype(jnp.bfloat16)

  def loss(w, w16):
    a = pool_grad.compute_copy(w, w16)
    b = pool_grad.compute_copy(w, w16)
    return jnp.sum(a.astype(jnp.float32) * 2.0) + jnp.sum(b.astype(jnp.float32) ** 2)

  gw, g16 = jax.grad(loss, argnums=(0, 1))(w, w16)
  assert gw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gw), 2.0 + 2 * np.asarray(w16.astype(jnp.float32)),
                             rtol=1e-2)
  assert float(jnp.abs(g16.astype(jnp.float32)).max()) == 0.0
  assert jnp.array_equal(pool_grad.compute_copy(w, w16), w16)
