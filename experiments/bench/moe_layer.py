"""Benchmark of the MoE FFN layer (jaxlm/layers/moe.py), fwd+bwd, against a dense SwiGLU of the
same active FLOPs (top-1 of width f == a dense SwiGLU of width f), and the share of the layer's
time spent in the three grouped matmuls (ops.gmm, fwd + both backward products).

  python experiments/bench_ops.py --op=moe_layer --shapes=bench

Rows per shape: dense SwiGLU; the MoE layer with each ops.gmm implementation that runs here;
"gmm only": the expert SwiGLU (3 gmm + activation) on already-sorted rows with the same group
sizes. UniPool shapes add "deferred pool grad": the layer as a model with
model.moe.pool_grad=deferred (the unipool_* presets) runs it, the pool under stop_gradient plus
its share (1/24) of the pool gradient computed once for 24 layers' rows. TFLOP/s counts active
matmul FLOPs only (3 products x 2*T*d*f, x3 for fwd+bwd); the
router, sort, permute and combine are overhead on top. The moe rows also note how long
reading and writing the pool's weights takes at the copy bandwidth (a floor for large pools).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing

# name, tokens, d_model, d_expert, moe kind, experts (per layer / pool), router
SHAPES = {
    "ci": [("tiny_vanilla", 256, 64, 128, "vanilla", 4, "softmax_topk"),
           ("tiny_unipool", 256, 64, 128, "unipool", 16, "norm_router")],
    "bench": [("469m_vanilla_e8", 16384, 1024, 4096, "vanilla", 8, "softmax_topk"),
              ("469m_unipool_m192", 16384, 1024, 4096, "unipool", 192, "norm_router")],
    # 64 sequences of 1024 per layer call (the paper's batch 512 over 8 GPUs): each of the
    # pool's 192 experts then sees ~340 tokens instead of ~85, so its weights are read once
    # per 4x more work. lax.ragged_dot is not run here (386 ms for the pool at 16k already).
    "bench_t64k": [("469m_vanilla_e8_t64k", 65536, 1024, 4096, "vanilla", 8, "softmax_topk"),
                   ("469m_unipool_m192_t64k", 65536, 1024, 4096, "unipool", 192,
                    "norm_router")],
}
_OWN_KERNEL_ONLY = ("bench_t64k",)
_ALIGN = 128                       # the H100/H200 gmm row tile
_LAYERS = 24                       # layers sharing the pool (469M) for the deferred row
_ALIGNED_ROW_MIN_EXPERTS = 64


def _layer(t, d, f, kind, n_experts, router, dtype, implementation, group_align=0):
  from flax import nnx
  from jaxlm.config import ModelConfig, MoEConfig
  from jaxlm.layers.moe import MoEFFN
  moe = MoEConfig(kind=kind, n_experts=n_experts, top_k=1, router=router, renormalize=False,
                  implementation=implementation, group_align=group_align)
  cfg = ModelConfig(d_model=d, d_ff=f, n_layers=24, n_heads=d // 64, n_kv_heads=4,
                    init_std=0.02, dtype=jnp.dtype(dtype).name, moe=moe)
  layer = MoEFFN(cfg, rngs=nnx.Rngs(params=0))
  graphdef, state = nnx.split(layer)
  return graphdef, state


def _experts(n, d, f, dtype, key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w_gate": (jax.random.normal(k1, (n, d, f), jnp.float32) * d ** -0.5).astype(dtype),
          "w_up": (jax.random.normal(k2, (n, d, f), jnp.float32) * d ** -0.5).astype(dtype),
          "w_down": (jax.random.normal(k3, (n, f, d), jnp.float32) * f ** -0.5).astype(dtype)}


def _group_sizes(loads, t):
  """Per-expert row counts of t rows from the layer's measured load fractions."""
  gs = np.round(loads * t).astype(np.int32)
  gs[-1] += t - gs.sum()
  return gs


def _deferred_times(name, t, d, f, n_exp, router, dtype, x, dy, experts, loads) -> dict:
  """The UniPool layer as a model with model.moe.pool_grad="deferred" runs it
  (jaxlm/layers/pool_grad.py): fwd+bwd with the pool under stop_gradient and the layer's taps
  (their cotangents are the rows the pool gradient needs), plus the pool gradient computed once
  for all _LAYERS layers' rows, charged 1/_LAYERS to each layer. {row name: ms}."""
  from flax import nnx
  from jaxlm.layers import pool_grad
  graphdef, state = _layer(t, d, f, "unipool", n_exp, router, dtype, "")
  tap = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in pool_grad.tap_shapes(
      pool_grad.TapSpec((0,), t, dtype), d, f, n_exp).items()}

  def layer_fn(x, s, tap, e):
    pool = {k: jax.lax.stop_gradient(v) for k, v in e.items()}
    return nnx.merge(graphdef, s)(x, dict(pool, tap=tap))[0]

  def step(x, s, tap, e):
    out, vjp = jax.vjp(lambda x, s, tap: layer_fn(x, s, tap, e), x, s, tap)
    return out, vjp(dy)

  layer_ms = timing.time_fn(jax.jit(step), x, state, tap, experts)
  # every layer's taps: random rows, each layer's group sizes those measured for this one
  keys = jax.random.split(jax.random.key(1), len(pool_grad.TAP_WIDTHS))
  taps = {k: jax.random.normal(kk, (_LAYERS, t, d if w == "d" else f), dtype)
          for kk, (k, w) in zip(keys, pool_grad.TAP_WIDTHS.items())}
  taps["gs"] = jnp.broadcast_to(jnp.asarray(_group_sizes(loads, t), jnp.float32),
                                (_LAYERS, n_exp))
  pool_ms = timing.time_fn(jax.jit(pool_grad.pool_gradient), taps)
  per_layer = layer_ms + pool_ms / _LAYERS
  print(f"{name} deferred: layer {layer_ms:.3f} ms + pool gradient {pool_ms:.3f} ms / "
        f"{_LAYERS} layers = {per_layer:.3f} ms", flush=True)
  return {f"moe[default, deferred pool grad, {_LAYERS} layers]": per_layer}


def run(shapes="bench", dtype="bfloat16", ceilings=None):
  from flax import nnx
  import ops.gmm
  from jaxlm.layers.expert_pool import swiglu_grouped
  dtype = jnp.dtype(dtype)
  rows = []
  from ops import _backend
  # our kernel first: XLA's ragged_dot can exhaust device memory on large pools
  on_gpu = _backend.platform() == "gpu"
  # "" = the default order (on Hopper: the Mosaic GPU gmm first)
  impls = ([""] if on_gpu else []) + [
      n for n in ("pallas_triton", "ragged_dot") if n in ops.gmm.implementations()
      and (n != "pallas_triton" or on_gpu)
      and not (n == "ragged_dot" and shapes in _OWN_KERNEL_ONLY)] or [""]
  for name, t, d, f, kind, n_exp, router in SHAPES[shapes]:
    # XLA's ragged_dot asked for 96 GiB at 192 experts on the H200 (session 12) and failed
    shape_impls = [i for i in impls if not (i == "ragged_dot" and on_gpu and n_exp > 64)]
    key = jax.random.key(0)
    kx, ke, kd, kw = jax.random.split(key, 4)
    x = jax.random.normal(kx, (1, t, d), dtype)
    dy = jax.random.normal(kd, (1, t, d), dtype)
    experts = _experts(n_exp, d, f, dtype, ke)
    flops = 3 * 3 * 2.0 * t * d * f  # 3 matmuls, fwd + bwd
    label = f"T={t} d={d} f={f} {kind} E={n_exp} top1 {router}"
    times, outs = {}, {}

    # dense SwiGLU with the same active FLOPs
    dense_w = jax.tree.map(lambda a: a[0], experts)

    def dense(x, w):
      x2 = x.reshape(t, d)
      h = jax.nn.silu(x2 @ w["w_gate"]) * (x2 @ w["w_up"])
      return (h @ w["w_down"]).reshape(x.shape)

    def fwd_bwd(fn, *args):
      out, vjp = jax.vjp(fn, *args)
      return out, vjp(dy)

    try:
      times["dense_swiglu"] = timing.time_fn(jax.jit(lambda x, w: fwd_bwd(dense, x, w)), x,
                                             dense_w)
      print(f"{name} dense_swiglu: {times['dense_swiglu']:.3f} ms", flush=True)
    except Exception as err:
      print(f"{name} dense failed: {type(err).__name__}: {str(err)[:300]}", flush=True)

    loads = None
    # pools of many small groups also with each expert's rows 128-row aligned (MoEConfig
    # group_align: no gmm row tile straddles two experts)
    variants = [(impl, 0) for impl in shape_impls] + (
        [("", _ALIGN)] if n_exp >= _ALIGNED_ROW_MIN_EXPERTS else [])
    for impl, align in variants:
      nm = f"moe[{impl or 'default'}" + (f", group_align {align}]" if align else "]")
      try:
        graphdef, state = _layer(t, d, f, kind, n_exp, router, dtype, impl, align)

        def layer_fn(x, state, experts, graphdef=graphdef):
          y, _, stats = nnx.merge(graphdef, state)(x, experts)
          return y

        step = jax.jit(lambda x, s, e: fwd_bwd(layer_fn, x, s, e))
        times[nm] = timing.time_fn(step, x, state, experts)
        print(f"{name} {nm}: {times[nm]:.3f} ms", flush=True)
        outs[nm] = step(x, state, experts)[0]
        if loads is None:
          _, _, st = jax.jit(lambda x, s, e: nnx.merge(graphdef, s)(x, e))(x, state, experts)
          loads = np.asarray(st["load"])
      except Exception as err:
        print(f"{name} {nm} failed: {type(err).__name__}: {str(err)[:400]}", flush=True)

    if kind == "unipool" and loads is not None:
      try:
        for nm, ms in _deferred_times(name, t, d, f, n_exp, router, dtype, x, dy, experts,
                                      loads).items():
          times[nm] = ms
      except Exception as err:
        print(f"{name} deferred failed: {type(err).__name__}: {str(err)[:400]}", flush=True)

    # gmm only: the expert SwiGLU on pre-sorted rows with the layer's group sizes
    if loads is not None:
      gs = jnp.asarray(_group_sizes(loads, t))
      for impl, align in variants:
        nm = f"gmm only[{impl or 'default'}" + (f", group_align {align}]" if align else "]")
        try:
          fn = lambda x, e, impl=impl, align=align: swiglu_grouped(
              x.reshape(t, d), gs, e["w_gate"], e["w_up"], e["w_down"], impl or None,
              align).reshape(x.shape)
          times[nm] = timing.time_fn(jax.jit(lambda x, e: fwd_bwd(fn, x, e)), x, experts)
        except Exception as err:
          print(f"{name} {nm} failed: {type(err).__name__}: {str(err)[:400]}", flush=True)

    # A floor no kernel can beat: every expert's weights are read in the forward, read again
    # for d x and written as d w in the backward (3 x the pool's bytes) at the copy bandwidth.
    weight_ms = None
    if ceilings is not None and ceilings.gbs:
      weight_bytes = 3 * n_exp * d * f * dtype.itemsize
      weight_ms = 3 * weight_bytes / (ceilings.gbs * 1e9) * 1e3
    ref = outs.get("moe[ragged_dot]")
    for nm, ms in times.items():
      ratios = {}
      if "dense_swiglu" in times and nm != "dense_swiglu":
        ratios["dense_swiglu"] = times["dense_swiglu"] / ms
      note = f"{t / (ms * 1e-3) / 1e6:.2f} Mtok/s"
      if nm.startswith("gmm only"):
        layer_nm = "moe[" + nm[len("gmm only["):]
        if layer_nm in times:
          note += f"; {100 * ms / times[layer_nm]:.0f}% of {layer_nm}"
      if nm.startswith("moe[") and ref is not None and nm in outs:
        err = float(jnp.linalg.norm((outs[nm] - ref).astype(jnp.float32))
                    / jnp.linalg.norm(ref.astype(jnp.float32)))
        note += f"; rel err vs ragged_dot {err:.1e}"
      if nm.startswith("moe[") and loads is not None:
        note += f"; max load x{loads.max() * len(loads):.2f}"
      if nm.startswith("moe[") and weight_ms is not None and "deferred" not in nm:
        note += f"; expert-weight traffic alone {weight_ms:.2f} ms"
        if "dense_swiglu" in times:
          note += f" (caps x vs dense at {times['dense_swiglu'] / weight_ms:.2f})"
      rows.append(timing.Row("moe_layer fwd+bwd", label, nm, ms, tflops=flops / ms / 1e9,
                             ratios=ratios, note=note))
  return rows


if __name__ == "__main__":
  print(timing.format_table(run(shapes=sys.argv[1] if len(sys.argv) > 1 else "bench"),
                            "moe_layer"))
