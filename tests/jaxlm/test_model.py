"""The dense transformer through its functional boundary (jaxlm.models.build)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import AttentionConfig
from jaxlm.models import build
from jaxlm.models.transformer import CACHE_AXES, init_cache
from jaxlm.train.step import token_losses
from tests.jaxlm.conftest import random_params, tiny_model
from tests.jaxlm.jaxpr_walk import all_eqns

B, S = 2, 16
TOL = 1e-4


def _tokens(vocab, b=B, s=S, seed=1) -> np.ndarray:
  # numpy inputs: slicing them in a loop compiles nothing (eager jnp slices each compile)
  return np.random.default_rng(seed).integers(0, vocab, (b, s)).astype(np.int32)


def _bump(tokens, t, vocab, by=7):
  out = tokens.copy()
  out[:, t] = (out[:, t] + by) % vocab
  return out


def _unstack(params, n_layers):
  """Stacked (scan_layers=True) params → the per-layer dict layout of scan_layers=False."""
  out = dict(params)
  out["blocks"] = {i: jax.tree.map(lambda a: a[i], params["blocks"]) for i in range(n_layers)}
  return out


# ------------------------------------------------------------------ shapes and axes

@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_output_shapes_and_param_axes(scan, tied):
  cfg = tiny_model(scan_layers=scan, tie_embeddings=tied)
  fm = build(cfg)
  params = random_params(fm)
  logits, cache = fm.apply(params, _tokens(cfg.vocab_size))
  assert logits.shape == (B, S, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cache is None
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert ("head" in params) == (not tied)
  axes = fm.logical_axes
  flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: type(x) is tuple)[0]
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  assert [p for p, _ in flat_axes] == [p for p, _ in flat_params]
  for (path, ax), (_, arr) in zip(flat_axes, flat_params):
    name = jax.tree_util.keystr(path)
    assert len(ax) == arr.ndim, name
    assert all(a is None or isinstance(a, str) for a in ax), name
    in_blocks = name.startswith("['blocks']")
    if scan and in_blocks:
      assert ax[0] == "layers" and arr.shape[0] == cfg.n_layers, name
    else:
      assert "layers" not in ax, name
  n = fm.num_params()
  assert n == sum(a.size for a in jax.tree.leaves(params))
  d, v, f, hd = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.resolved_head_dim
  per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f + 2 * d
  assert n == cfg.n_layers * per_layer + v * d + d + (0 if tied else d * v)


def test_init_matches_abstract_shapes_and_is_deterministic_in_the_key():
  cfg = tiny_model()
  fm = build(cfg)
  a, b, c = fm.init(jax.random.key(3)), fm.init(jax.random.key(3)), fm.init(jax.random.key(4))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), fm.param_shapes)
  # truncated normal with init_std; norm scales start at one; out projections are scaled down
  emb = np.asarray(a["embed"]["embedding"])
  assert np.abs(emb).max() <= 2 * cfg.init_std + 1e-7
  assert 0.5 * cfg.init_std < emb.std() < cfg.init_std
  assert np.all(np.asarray(a["final_norm"]["scale"]) == 1)
  assert np.asarray(a["blocks"]["mlp"]["w_down"]).std() < 0.7 * emb.std()
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not np.array_equal(a["embed"]["embedding"], c["embed"]["embedding"])


def test_cache_layout():
  cfg = tiny_model(n_kv_heads=2)
  cache = init_cache(cfg, 3, 20)
  assert cache["k"].shape == (cfg.n_layers, 3, 20, 2, cfg.resolved_head_dim)
  assert cache["lengths"].shape == (3,)
  for k, ax in CACHE_AXES.items():
    assert len(ax) == cache[k].ndim


# ------------------------------------------------------------------ causality

@pytest.mark.parametrize("attention", [AttentionConfig(), AttentionConfig(kind="sliding", window=4)])
def test_causal_masking(attention):
  cfg = tiny_model(attention=attention)
  fm = build(cfg)
  params = random_params(fm)
  tokens = _tokens(cfg.vocab_size)
  apply = jax.jit(lambda p, t: fm.apply(p, t)[0])
  base = np.asarray(apply(params, tokens))
  for t in (0, 5, S - 1):
    changed = _bump(tokens, t, cfg.vocab_size)
    out = np.asarray(apply(params, changed))
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4  # the token itself does matter
  if attention.kind == "sliding":
    # outside the window (window=4: keys pos-3..pos) a token no longer matters
    changed = _bump(tokens, 2, cfg.vocab_size)
    out = np.asarray(apply(params, changed))
    # layer 2 sees layer-1 outputs, so influence reaches 2*(window-1) positions ahead
    reach = 2 + cfg.n_layers * (attention.window - 1)
    np.testing.assert_allclose(out[:, reach + 1:], base[:, reach + 1:], atol=1e-6, rtol=0)
    assert np.abs(out[:, reach] - base[:, reach]).max() > 1e-6


# ------------------------------------------------------------------ KV cache decoding

DECODE_CASES = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "sliding_gqa": dict(n_heads=4, n_kv_heads=2, attention=AttentionConfig(kind="sliding", window=5)),
    "unscanned_tied": dict(scan_layers=False, tie_embeddings=True),
    "mha_soft_cap": dict(n_heads=4, n_kv_heads=4, attention=AttentionConfig(soft_cap=5.0)),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_kv_cache_decode_matches_full_forward(case):
  cfg = tiny_model(**DECODE_CASES[case])
  fm = build(cfg)
  params = random_params(fm)
  tokens = _tokens(cfg.vocab_size)
  full = np.asarray(jax.jit(lambda p, t: fm.apply(p, t)[0])(params, tokens))
  step = jax.jit(lambda p, t, c: fm.apply(p, t, cache=c))
  prefix = 6
  cache = init_cache(cfg, B, S, jnp.float32)
  logits, cache = step(params, tokens[:, :prefix], cache)
  np.testing.assert_allclose(np.asarray(logits), full[:, :prefix], atol=TOL, rtol=TOL)
  for t in range(prefix, S):
    logits, cache = step(params, tokens[:, t:t + 1], cache)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=TOL, rtol=TOL,
                               err_msg=f"{case}: decode step at position {t}")
  assert np.array_equal(np.asarray(cache["lengths"]), [S] * B)


def test_kv_cache_chunked_prefill_and_ragged_lengths():
  """Chunks of several tokens, and rows whose caches hold different lengths."""
  cfg = tiny_model(attention=AttentionConfig(kind="sliding", window=6))
  fm = build(cfg)
  params = random_params(fm)
  tokens = _tokens(cfg.vocab_size)
  full = np.asarray(jax.jit(lambda p, t: fm.apply(p, t)[0])(params, tokens))
  step = jax.jit(lambda p, t, c: fm.apply(p, t, cache=c))
  cache = init_cache(cfg, B, S, jnp.float32)
  out = []
  for lo, hi in ((0, 9), (9, 10), (10, 16)):
    logits, cache = step(params, tokens[:, lo:hi], cache)
    out.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=TOL, rtol=TOL)
  # ragged: both rows hold 9 cached tokens, then row 0 is cut back to 4. Its stale entries
  # 4..8 must be ignored and overwritten; each row decodes its next token at its own position.
  cache = init_cache(cfg, B, S, jnp.float32)
  _, cache = step(params, tokens[:, :9], cache)
  cache = dict(cache, lengths=jnp.asarray([4, 9], jnp.int32))
  nxt = np.stack([tokens[0, 4], tokens[1, 9]])[:, None]
  logits, cache = step(params, nxt, cache)
  np.testing.assert_allclose(np.asarray(logits[0, 0]), full[0, 4], atol=TOL, rtol=TOL)
  np.testing.assert_allclose(np.asarray(logits[1, 0]), full[1, 9], atol=TOL, rtol=TOL)
  assert np.asarray(cache["lengths"]).tolist() == [5, 10]


# ------------------------------------------------------------------ scan vs loop, remat

def test_scan_layers_equals_unrolled_layers():
  cfg_scan = tiny_model(scan_layers=True, n_layers=3)
  cfg_loop = tiny_model(scan_layers=False, n_layers=3)
  fm_scan, fm_loop = build(cfg_scan), build(cfg_loop)
  params = random_params(fm_scan)
  loop_params = _unstack(params, 3)
  assert jax.tree.structure(loop_params) == jax.tree.structure(fm_loop.param_shapes)
  tokens = _tokens(cfg_scan.vocab_size)
  a = fm_scan.apply(params, tokens)[0]
  b = fm_loop.apply(loop_params, tokens)[0]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _loss_and_grads(cfg, params, batch):
  fm = build(cfg)
  fn = jax.jit(jax.value_and_grad(lambda p: token_losses(fm, p, batch, 0.0)[0]))
  return fn(params)


_BASELINE = {}


def _baseline(scan):
  """(params, batch, loss, grads) without remat, computed once per layout."""
  if scan not in _BASELINE:
    cfg = tiny_model(scan_layers=scan, remat="none")
    params = random_params(build(cfg))
    tokens = _tokens(cfg.vocab_size, s=S + 1)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    _BASELINE[scan] = (params, batch) + tuple(_loss_and_grads(cfg, params, batch))
  return _BASELINE[scan]


@pytest.mark.parametrize("scan,remat", [(True, "full"), (True, "dots"), (True, "dots_no_batch"),
                                        (False, "full"), (False, "dots_and_acts"),
                                        (True, "dots_and_acts")])
def test_remat_gives_same_loss_and_grads(scan, remat):
  params, batch, loss0, g0 = _baseline(scan)
  loss1, g1 = _loss_and_grads(tiny_model(scan_layers=scan, remat=remat), params, batch)
  np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-4)
  assert float(optax_global_norm(g0)) > 0


def test_dots_and_acts_keeps_the_named_activations(capsys):
  """remat="dots_and_acts" saves the SwiGLU product and the norm outputs for the backward;
  "dots" recomputes them."""
  from jax.ad_checkpoint import print_saved_residuals
  params, batch, _, _ = _baseline(False)
  counts = {}
  for remat in ("dots_and_acts", "dots"):
    cfg = tiny_model(scan_layers=False, remat=remat)
    fm = build(cfg)
    loss = lambda p: jnp.mean(fm.apply(p, batch["inputs"])[0])
    print_saved_residuals(loss, params)
    out = capsys.readouterr().out
    counts[remat] = (out.count("named 'mlp_act'"), out.count("named 'norm_out'"))
  # one SwiGLU product per layer; the final norm (outside the remat'd blocks) is kept by both,
  # the blocks' norms (before attention and before the MLP) only by dots_and_acts
  assert counts["dots_and_acts"] == (cfg.n_layers, 2 * cfg.n_layers + 1)
  assert counts["dots"] == (0, 1)


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_segment_ids_isolate_documents():
  """Packed sequences: tokens of segment 2 never see segment 1."""
  cfg = tiny_model()
  fm = build(cfg)
  params = random_params(fm)
  tokens = _tokens(cfg.vocab_size)
  seg = jnp.concatenate([jnp.ones((B, 6), jnp.int32), 2 * jnp.ones((B, S - 6), jnp.int32)], axis=1)
  base = np.asarray(fm.apply(params, tokens, segment_ids=seg)[0])
  changed = _bump(tokens, 2, cfg.vocab_size, by=3)
  out = np.asarray(fm.apply(params, changed, segment_ids=seg)[0])
  np.testing.assert_allclose(out[:, 6:], base[:, 6:], atol=1e-6, rtol=0)
  assert np.abs(out[:, 2:6] - base[:, 2:6]).max() > 1e-4


def test_bf16_compute_stays_close_to_f32():
  p32 = random_params(build(tiny_model(dtype="float32")))
  tokens = _tokens(64)
  a = build(tiny_model(dtype="float32")).apply(p32, tokens)[0]
  b = build(tiny_model(dtype="bfloat16")).apply(p32, tokens)[0]
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-2)


def test_dots_remat_saves_the_cudnn_attention_forward():
  """remat="dots" keeps cuDNN attention's forward outputs (else every layer's attention forward
  runs again in the backward); the primitive names are the installed JAX's."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  from jaxlm.models.stacking import CUDNN_ATTENTION_FWD, REMAT_POLICIES, save_fused_attention
  assert {fa._dot_product_attention_fwd_p.name,
          fa._dot_product_attention_fwd_p_wrapper.name} <= CUDNN_ATTENTION_FWD
  assert save_fused_attention(fa._dot_product_attention_fwd_p_wrapper)
  assert not save_fused_attention(fa._dot_product_attention_bwd_p)
  assert not save_fused_attention(jax.lax.exp_p)
  policy = REMAT_POLICIES["dots"]
  assert policy(fa._dot_product_attention_fwd_p_wrapper) is True
  f32 = jax.core.ShapedArray((4, 4), jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  assert policy(jax.lax.dot_general_p, f32, f32, dimension_numbers=dims, precision=None,
                preferred_element_type=None)
  assert not policy(jax.lax.exp_p, f32)


def test_dots_remat_saves_pallas_kernel_outputs(capsys):
  """remat="dots" keeps what a Pallas kernel returns (NSA's branches, gmm, LIF, scan are Pallas
  calls, not dots: else each runs again in the backward); "full" keeps nothing. The kernel's
  primitive name is the installed JAX's."""
  from jax.ad_checkpoint import print_saved_residuals
  from jax.experimental import pallas as pl
  from jaxlm.models.stacking import PALLAS_KERNELS, REMAT_POLICIES

  def double(x_ref, o_ref):
    o_ref[...] = 2.0 * x_ref[...]

  def raw(x):
    return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          interpret=True)(x)

  # as ops wrap their kernels: the forward rule calls the kernel itself (the policy then sees
  # the pallas_call; a nested custom_vjp would hide it, which is why gmm's outputs are named)
  kernel = jax.custom_vjp(raw)
  kernel.defvjp(lambda x: (raw(x), None), lambda _, g: (2.0 * g,))

  def f(x):
    return jnp.sum(jnp.sin(kernel(x)))

  x = jnp.ones((8, 128), jnp.float32)
  names = {e.primitive.name for e in jax.make_jaxpr(raw)(x).jaxpr.eqns}
  assert names & PALLAS_KERNELS
  saved = {}
  for remat in ("dots", "dots_and_acts", "full"):
    print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES[remat]), x)
    saved[remat] = "pallas_call" in capsys.readouterr().out
  assert saved == {"dots": True, "dots_and_acts": True, "full": False}
  print_saved_residuals(jax.checkpoint(f, policy=REMAT_POLICIES["dots_only"]), x)
  assert "pallas_call" not in capsys.readouterr().out     # the policy "dots" was before
  g = jax.grad(jax.checkpoint(f, policy=REMAT_POLICIES["dots"]))(x)
  np.testing.assert_allclose(np.asarray(g), 2 * np.cos(2.0), rtol=1e-6)


def test_dots_remat_saves_mosaic_gpu_kernel_outputs():
  """Traced for an H200 (ops' target; no GPU needed to trace): the Mosaic GPU attention with
  lse (NSA's compressed branch on GPU) runs its forward kernel once under remat "dots", twice
  (forward and the backward's recompute) under "dots_only"."""
  import ops.attention
  from ops import _backend
  from jaxlm.models.stacking import PALLAS_KERNELS, REMAT_POLICIES

  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)

  def loss(q, k, v):
    o, lse = ops.attention.attention(q, k, v, causal=True, return_lse=True,
                                     implementation="pallas_mosaic_gpu")
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(lse)

  def forward_kernels(jaxpr) -> int:
    """Kernel eqns anywhere in the jaxpr with the forward kernel's outputs (o, lse)."""
    return sum(e.primitive.name in PALLAS_KERNELS
               and [v.aval.shape for v in e.outvars] == [(1, 128, 2, 64), (1, 2, 128)]
               for e, _ in all_eqns(jaxpr))

  runs = {}
  with _backend.target("gpu", "NVIDIA H200"):
    for remat in ("dots", "dots_only"):
      grad = jax.grad(jax.checkpoint(loss, policy=REMAT_POLICIES[remat]), argnums=(0, 1, 2))
      runs[remat] = forward_kernels(jax.make_jaxpr(grad)(q, q, q).jaxpr)
  assert runs == {"dots": 1, "dots_only": 2}
