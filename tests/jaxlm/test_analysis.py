"""Analysis tools (jaxlm/analysis): constructed cases with known answers, and each script end to
end on a few-step tiny run."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.analysis import common, expert_sharing, gated_lpi, head_masking
from jaxlm.analysis import routing_consistency as rc
from jaxlm.config import MoEConfig
from jaxlm.models import build
from tests.jaxlm.conftest import random_params, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "dense": tiny_model(),
    "vanilla": tiny_model(moe=MoEConfig(kind="vanilla", n_experts=4, top_k=2, d_expert=32)),
    "unipool": tiny_model(moe=MoEConfig(kind="unipool", n_experts=6, top_k=1, d_expert=32,
                                        router="norm_router", norm_router_samples=512)),
}


def _tokens(cfg, b=2, s=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, cfg.vocab_size)


# --------------------------------------------------------------------------- probe forward

@pytest.mark.parametrize("kind", list(MODELS))
def test_probe_forward_matches_model(kind):
  fm = build(MODELS[kind])
  params = random_params(fm, std=0.2)
  tok = _tokens(fm.cfg)
  ref = jax.jit(lambda p, t: fm.apply(p, t)[0])(params, tok)
  out = jax.jit(lambda p, t: common.probe_forward(fm, p, t, record_routing=True))(params, tok)
  np.testing.assert_allclose(out["logits"], ref, atol=1e-5, rtol=1e-5)
  if kind != "dense":
    assert out["routing"]["ids"].shape == (2, 2, 12, fm.cfg.moe.top_k)


def test_head_mask_is_exact_and_unscanned_layout_agrees():
  cfg = MODELS["dense"]
  fm = build(cfg)
  params = random_params(fm, std=0.2)
  tok = _tokens(cfg)
  ones = jnp.ones((cfg.n_layers, cfg.n_heads))
  np.testing.assert_array_equal(fm.apply(common.scale_heads(params, ones), tok)[0],
                                fm.apply(params, tok)[0])
  mask = ones.at[1, 2].set(0.0)
  masked = fm.apply(common.scale_heads(params, mask), tok)[0]
  assert float(jnp.max(jnp.abs(masked - fm.apply(params, tok)[0]))) > 1e-4
  # the same through the per-layer (scan_layers=False) parameter layout
  fm_u = build(tiny_model(scan_layers=False))
  blocks = params["blocks"]
  params_u = dict(params, blocks={i: jax.tree.map(lambda a, i=i: a[i], blocks)
                                  for i in range(cfg.n_layers)})
  params_u = jax.tree.map(lambda a: a, params_u)
  np.testing.assert_allclose(fm_u.apply(common.scale_heads(params_u, mask), tok)[0], masked,
                             atol=1e-5)


# --------------------------------------------------------------------------- Gated-LPI

def _grad_f(fm, params, tok, tgt):
  return jax.jit(jax.grad(lambda p, t, y: common.sum_logprob(fm, p, t, y)))(params, tok, tgt)


def test_gated_lpi_planted_ffn_neuron_gets_the_improvement():
  """All FFN params drift by small noise; one neuron (layer 1, n=7) moves along the gradient of
  the log-prob. That neuron carries the improvement and must get (nearly) all of it, and the
  attributions must add up to the log-prob change (completeness)."""
  fm = build(MODELS["dense"])
  p0 = random_params(fm, std=0.2)
  tok = _tokens(fm.cfg)
  tgt = _tokens(fm.cfg, seed=2)
  g = _grad_f(fm, p0, tok, tgt)
  rng = np.random.default_rng(0)
  mlp = p0["blocks"]["mlp"]
  new = {}
  for name, axis in (("w_gate", 2), ("w_up", 2), ("w_down", 1)):
    noise = jnp.asarray(rng.normal(0, 1e-5, mlp[name].shape), jnp.float32)
    plant = jnp.zeros(mlp[name].shape).at[(1,) + (slice(None),) * (axis - 1) + (7,)].set(1.0)
    new[name] = mlp[name] + noise + 0.2 * plant * g["blocks"]["mlp"][name]
  p1 = dict(p0, blocks=dict(p0["blocks"], mlp=new))
  contrib, (f0, f1) = gated_lpi.integrated_gradients(fm, p0, p1, tok, tgt, steps=16)
  units = gated_lpi.group_units(fm.cfg, contrib)
  assert f1 - f0 > 0.05
  np.testing.assert_allclose(gated_lpi.total(units), f1 - f0, rtol=2e-3, atol=1e-4)
  ffn = units["ffn"]
  assert np.unravel_index(np.argmax(ffn), ffn.shape) == (1, 7)
  assert ffn[1, 7] > 0.95 * (f1 - f0)
  assert gated_lpi.top_share(ffn, 0.01) > 0.9
  np.testing.assert_allclose(units["heads"], 0.0, atol=1e-9)   # attention did not change


def test_gated_lpi_planted_head_and_expert_neuron():
  """Only attention head (layer 0, head 3) changes -> all attribution on that head; only one
  UniPool expert neuron changes -> all on that (expert, neuron) unit, exactly as Δ log p."""
  fm = build(MODELS["unipool"])
  p0 = random_params(fm, std=0.2)
  tok, tgt = _tokens(fm.cfg), _tokens(fm.cfg, seed=2)
  g = _grad_f(fm, p0, tok, tgt)
  wq = p0["blocks"]["attn"]["wq"]
  wq1 = wq + jnp.zeros_like(wq).at[0, :, 3].set(0.3 * g["blocks"]["attn"]["wq"][0, :, 3])
  p1 = dict(p0, blocks=dict(p0["blocks"], attn=dict(p0["blocks"]["attn"], wq=wq1)))
  contrib, (f0, f1) = gated_lpi.integrated_gradients(fm, p0, p1, tok, tgt, steps=8)
  units = gated_lpi.group_units(fm.cfg, contrib)
  heads = units["heads"]
  assert abs(heads[0, 3]) > 0 and np.count_nonzero(heads) == 1
  np.testing.assert_allclose(np.sum(units["expert"]), 0.0, atol=1e-12)
  wd, gd = p0["pool"]["w_down"], g["pool"]["w_down"]
  e, n = np.unravel_index(int(jnp.argmax(jnp.sum(gd[0] ** 2, axis=-1))), gd.shape[1:3])
  wd1 = wd.at[0, e, n].add(5.0 * gd[0, e, n] / jnp.linalg.norm(gd[0, e, n]))
  p2 = dict(p0, pool=dict(p0["pool"], w_down=wd1))
  contrib, (f0, f2) = gated_lpi.integrated_gradients(fm, p0, p2, tok, tgt, steps=8)
  expert = gated_lpi.group_units(fm.cfg, contrib)["expert"]
  assert np.count_nonzero(expert) == 1 and expert[0, e, n] > 0.01
  # routing does not depend on W_down, so the path has no routing switch: complete
  np.testing.assert_allclose(expert[0, e, n], f2 - f0, rtol=2e-2)


def test_concentration_and_stability_known_values():
  a = np.array([10.0] + [1.0] * 99 + [-50.0])           # 101 units, positive total 109
  assert gated_lpi.top_share(a, 0.01) == pytest.approx((10 + 1) / 109)   # ceil(1.01) = 2
  x, y = gated_lpi.concentration_curve(a)
  assert y[0] == pytest.approx(10 / 109) and y[-1] == pytest.approx(1.0)
  v = np.arange(100.0)
  st = gated_lpi.stability([v, v[::-1], v], 0.1)
  assert st["consecutive"] == pytest.approx([-1.0, -1.0])
  assert st["vs_last"] == pytest.approx([1.0, -1.0, 1.0])
  assert st["top_overlap_vs_last"] == pytest.approx([1.0, 0.0, 1.0])


# --------------------------------------------------------------------------- routing consistency

def test_srp_hand_trace():
  # windows of 2 over 0,0,1,1 (k=1): {0,0}: F1 1 (TP 2, den 4); {0,1}: best set {0,1}
  # (TP 2, den 2*2+2 = 6); {1,1}: 1 -> micro 2*6 / 14.
  assert rc.srp(np.array([0, 0, 1, 1]), 2, 2) == pytest.approx(12 / 14)
  assert rc.srp(np.array([3] * 10), 4, 4) == pytest.approx(1.0)
  # round robin over 4 experts, m = 4: every window has 4 experts once; best F1 =
  # max_j 2j / (4j + 4) -> j = 4: 8/20
  assert rc.srp(np.tile(np.arange(4), 5), 4, 4) == pytest.approx(0.4)
  # top-2 trace: tokens all use {0, 1}: perfect
  assert rc.srp(np.tile([[0, 1]], (8, 1)), 4, 4) == pytest.approx(1.0)
  # brute-force threshold search agrees on random traces
  rng = np.random.default_rng(0)
  for _ in range(5):
    ids = rng.integers(0, 5, size=(1, 30, 2))
    m = 6
    num = den = 0.0
    for t in range(30 - m + 1):
      c = np.bincount(ids[0, t:t + m].ravel(), minlength=5)
      best = max(((2 * c[c >= p].sum(), m * (c >= p).sum() + c.sum())
                  for p in range(c.max(), 0, -1)), key=lambda z: z[0] / z[1])  # ties: smallest set
      num += best[0]
      den += best[1]
    assert rc.srp(ids, 5, m) == pytest.approx(num / den)


def test_cache_hit_rates_hand_trace():
  trace = np.array([0, 1, 2, 0, 1, 2])
  assert rc.cache_hit_rate(trace, 3, 2, "lru") == 0.0                    # LRU thrashes
  assert rc.cache_hit_rate(trace, 3, 2, "belady") == pytest.approx(2 / 6)  # MIN
  # segment policy, m=16: t=2 evicts 0 (tie, LRU), t=3 evicts 1, t=4 evicts 0 (no future use)
  assert rc.sch(trace, 3, 16, 2) == pytest.approx(1 / 6)
  for policy in ("lru", "belady", "segment"):
    assert rc.cache_hit_rate(trace, 3, 3, policy) == pytest.approx(3 / 6)
  # segment with m=0 is LRU; 0,0,1,0: one slot, hits at t=1 only
  assert rc.sch(np.array([0, 1, 0, 2, 0, 1]), 3, 0, 2) == \
      rc.cache_hit_rate(np.array([0, 1, 0, 2, 0, 1]), 3, 2, "lru")
  res = rc.analyze(np.stack([trace[None, :, None]] * 2), 3, 1, (2,), (1, 2))
  assert res["lru"][2] == [0.0, 0.0] and len(res["srp"][2]) == 2


# --------------------------------------------------------------------------- DES

def test_des_coresets_hand_made_router():
  scores = jnp.array([[[.6, .3, .1, 0.], [.1, .3, .5, .1], [.0, .1, .2, .7], [.4, .0, .5, .1]]])
  ids = jnp.array([[[0, 1], [2, 1], [3, 2], [2, 0]]])
  routing = {"scores": scores, "ids": ids, "gates": jnp.take_along_axis(scores, ids, -1)}
  seq = expert_sharing.seq_coreset(routing, 2, 1)
  np.testing.assert_array_equal(seq[0], [[1, 0, 1, 0]] * 2 + [[0, 0, 1, 1]] * 2)
  # block 0 votes: e0 .6, e1 .6, e2 .5 -> keep max(K=2, ceil(.25*4)=1) = {0, 1}
  # block 1 votes: e0 .4, e2 .7, e3 .7 -> {2, 3}
  vote = expert_sharing.vote_coreset(routing, 2, 0.25, 2)
  np.testing.assert_array_equal(vote[0], [[1, 1, 0, 0]] * 2 + [[0, 0, 1, 1]] * 2)
  # whole sequence, beta 0.75 -> 3 experts: votes e0 1.0, e1 .6, e2 1.2, e3 .7 -> {0, 2, 3}
  vote = expert_sharing.vote_coreset(routing, 4, 0.75, 2)
  np.testing.assert_array_equal(vote[0, 0], [1, 0, 1, 1])


def test_des_in_the_model():
  fm = build(MODELS["vanilla"])
  params = random_params(fm, std=0.2)
  tok = _tokens(fm.cfg, b=2, s=16)
  batch = {"inputs": tok, "targets": _tokens(fm.cfg, b=2, s=16, seed=3)}
  base = expert_sharing.evaluate(fm, params, batch, "none", 8)
  keep_all = expert_sharing.evaluate(fm, params, batch, "vote", 8, 1.0)
  assert keep_all["loss"] == pytest.approx(base["loss"], abs=1e-5)    # C = every expert
  tight = expert_sharing.evaluate(fm, params, batch, "vote", 8, 0.25)
  assert tight["unique"] == pytest.approx(2.0)                        # max(K=2, 1) per block
  assert base["unique"] > 2.0
  ids = tight["ids"].reshape(fm.cfg.n_layers, 2, 2, 8, 2)              # every block uses 2
  for blk in ids.reshape(-1, 16):
    assert len(np.unique(blk)) == 2


# --------------------------------------------------------------------------- head masking

def test_mine_triples_and_cloze():
  docs = ["The Duke of York met the Duke of York and the Duke of Kent. " * 2,
          "Prince of Wales, Prince of Wales, Prince of Wales. the end of Days of Days"]
  facts = head_masking.mine_triples(docs, ("of",), min_count=3)
  assert facts == [("Duke", "of", "York", 4), ("Prince", "of", "Wales", 3)]
  from jaxlm.data import ByteTokenizer
  batch, kept = head_masking.cloze_batch(ByteTokenizer(), facts)
  assert kept == [("Duke", "of", "York"), ("Prince", "of", "Wales")]
  assert int(batch["answer"][0]) == ByteTokenizer().encode(" ")[0]   # byte level: the space


def test_hit_at_10_and_head_importance():
  cfg = MODELS["dense"]
  fm = build(cfg)
  params = random_params(fm, std=0.2)
  batch = {"tokens": _tokens(cfg, b=6, s=5), "last": jnp.array([4, 2, 3, 4, 0, 1]),
           "answer": jnp.array([9, 3, 9, 1, 2, 60])}
  logits = np.asarray(fm.apply(params, batch["tokens"])[0])[np.arange(6), np.asarray(batch["last"])]
  for k in (1, 10, 40):
    want = np.mean([(l > l[a]).sum() < k for l, a in zip(logits, np.asarray(batch["answer"]))])
    assert head_masking.hit_at_k(fm, params, batch, k=k) == pytest.approx(want)
  # a head whose output projection is zero has zero gradient importance
  wo = params["blocks"]["attn"]["wo"].at[1, 2].set(0.0)
  p = dict(params, blocks=dict(params["blocks"], attn=dict(params["blocks"]["attn"], wo=wo)))
  imp = head_masking.gradient_importance(fm, p, batch)
  assert imp.shape == (cfg.n_layers, cfg.n_heads) and imp[1, 2] == 0.0 and imp.min() >= 0
  assert np.count_nonzero(imp) == imp.size - 1
  curve = head_masking.mask_curve(fm, p, batch, imp, [0, cfg.n_layers * cfg.n_heads])
  assert curve[0] == head_masking.hit_at_k(fm, p, batch)


# --------------------------------------------------------------------------- scripts

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """Few-step dense and MoE runs (the default Shakespeare corpus, as --preset=tiny uses)."""
  work = str(tmp_path_factory.mktemp("runs"))
  extra = ["train.batch_size=2", "train.seq_len=32", "train.eval_batches=1"]
  common.train_run(common.tiny_config("moe_top2", work, steps=4, checkpoint_every=2,
                                      batch_size=2, seq_len=32, extra=extra))
  return work


SCRIPTS = {
    "analyze_gated_lpi.py": ["--kinds=moe_top2", "--ig_steps=1", "--n_seqs=2"],
    "analyze_head_masking.py": ["--kinds=moe_top2", "--ks=1,2", "--ig_steps=1",
                                "--max_triples=16", "--importance=gradient,lpi,random"],
    "analyze_routing_consistency.py": ["--kinds=moe_top2", "--n_seqs=2", "--segments=4,16"],
    "analyze_expert_sharing.py": ["--kinds=moe_top2", "--n_seqs=2", "--blocks=8"],
}


# One script in the default run (CPU time); the other three are `slow` (each about a minute
# on an idle 2-core CPU, several under load): python -m pytest -m slow tests/jaxlm/test_analysis.py
@pytest.mark.parametrize("script", [
    s if s == "analyze_routing_consistency.py" else pytest.param(s, marks=pytest.mark.slow)
    for s in SCRIPTS])
def test_script_end_to_end_tiny(script, tiny_runs, tmp_path):
  out = tmp_path / "out"
  args = [sys.executable, os.path.join(ROOT, "experiments", script), "--preset=tiny",
          f"--work_dir={tiny_runs}", f"--out_dir={out}", "--train_steps=4",
          "--checkpoint_every=2", "--set=train.batch_size=2", "--set=train.seq_len=32",
          "--set=train.eval_batches=1"] + SCRIPTS[script]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mds = list(out.glob("*.md"))
  pngs = list(out.glob("*.png"))
  assert len(mds) == 1 and pngs
  assert "|---|" in mds[0].read_text()
