"""Benchmark of ops.gmm: every implementation vs lax.ragged_dot, a dense batched einsum of
the same FLOPs ([e, m/e, k] x [e, k, n]) and tokamax's ragged_dot where importable.

  python experiments/bench_ops.py --op=gmm --shapes=bench
  python experiments/bench/gmm.py --sweep        # tile sweep of the Triton kernels

fwd: out = gmm(lhs, rhs); fwd+bwd: out and both gradients (3x the forward FLOPs).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp

from experiments.bench import timing
from ops import _backend
from ops import gmm as gmm_op
from ops.gmm import shapes as gmm_shapes
from ops.gmm.config import GmmBlockConfig
from third_party import tokamax


def _inputs(m, k, n, e, routing, dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(k1, (m, k), dtype)
  rhs = (jax.random.normal(k2, (e, k, n), jnp.float32) * k ** -0.5).astype(dtype)
  dout = jax.random.normal(k3, (m, n), dtype)
  gs = jnp.asarray(gmm_shapes.group_sizes_for(m, e, routing))
  return lhs, rhs, dout, gs


def _fwd_bwd(f):
  def step(lhs, rhs, gs, dout):
    out, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
    return (out, *vjp(dout))
  return jax.jit(step)


def _candidates(tokamax_rd):
  impls = {}
  for name in gmm_op.implementations():
    if name == "xla" or (name.startswith("pallas_tpu") and _backend.platform() != "tpu"):
      continue  # "xla" loops over all groups: e x the FLOPs, not a contender
    impls[name] = (lambda nm: lambda a, b, gs: gmm_op.gmm(a, b, gs, implementation=nm))(name)
  if "pallas_mosaic_gpu" in impls and _backend.platform() == "gpu":
    # the compute warpgroups on the rows of a (2 x 128) x 128 tile instead of its columns
    # (untimed when written, session 10); compare with the pallas_mosaic_gpu row, whose
    # backward uses the same (Mosaic GPU) tgmm
    split = GmmBlockConfig.for_device(_backend.device_kind()).replace(
        mgpu_compute_wgs=2, mgpu_split_m=1, mgpu_block_n=128)
    impls["pallas_mosaic_gpu_split_m"] = lambda a, b, gs: gmm_op.gmm(
        a, b, gs, implementation="pallas_mosaic_gpu", config=split)
    # each CTA's tiles as one chained pipeline (mgpu_chain_tiles; untimed when written,
    # session 23): the next tile's loads overlap the current tile's end and store
    chained = GmmBlockConfig.for_device(_backend.device_kind()).replace(mgpu_chain_tiles=1)
    impls["pallas_mosaic_gpu_chained"] = lambda a, b, gs: gmm_op.gmm(
        a, b, gs, implementation="pallas_mosaic_gpu", config=chained)
    # 64-row tiles: half the rows computed twice where a tile straddles two groups (UniPool's
    # ~171-row groups in 128-row tiles visit ~1.75x the tiles of their rows), less reuse
    m64 = GmmBlockConfig.for_device(_backend.device_kind()).replace(mgpu_block_m=64)
    impls["pallas_mosaic_gpu_m64"] = lambda a, b, gs: gmm_op.gmm(
        a, b, gs, implementation="pallas_mosaic_gpu", config=m64)
    # (2 x 64) x 256 CTA tiles split by rows: the rhs tile is shared as in the default's
    # 128 x (2 x 128), and a warpgroup whose 64 rows hold none of the visit's group skips its
    # products, so straddling visits cost 64 rows of work (session 24, H100: no faster than
    # the default on UniPool's shapes)
    split64 = GmmBlockConfig.for_device(_backend.device_kind()).replace(
        mgpu_compute_wgs=2, mgpu_split_m=1, mgpu_block_m=64, mgpu_block_n=256)
    impls["pallas_mosaic_gpu_split_m64"] = lambda a, b, gs: gmm_op.gmm(
        a, b, gs, implementation="pallas_mosaic_gpu", config=split64)
  # what models get: the platform's default lists for gmm and (in the backward) tgmm
  impls["default"] = lambda a, b, gs: gmm_op.gmm(a, b, gs)
  tuned = os.environ.get("GMM_TUNED_CONFIG")
  if tuned and os.path.exists(tuned) and "pallas_triton" in impls:
    import json
    with open(tuned) as f:
      cfg = GmmBlockConfig.for_device(_backend.device_kind(), _backend.platform()).replace(
          **json.load(f))
    print(f"pallas_triton_tuned uses {cfg}", flush=True)
    impls["pallas_triton_tuned"] = lambda a, b, gs: gmm_op.gmm(
        a, b, gs, implementation="pallas_triton", config=cfg)
  if tokamax_rd is not None:
    impls["tokamax"] = lambda a, b, gs: tokamax_rd(a, b, gs)
  return impls


def run(shapes="bench", dtype="bfloat16", ceilings=None):
  dtype = jnp.dtype(dtype)
  rows = []
  impls = _candidates(tokamax.ragged_dot())
  for name, m, k, n, e, routing in gmm_shapes.SETS[shapes]:
    lhs, rhs, dout, gs = _inputs(m, k, n, e, routing, dtype)
    label = f"m={m} k={k} n={n} e={e} {routing}"
    flops = 2.0 * m * k * n
    # Dense batched einsum with the same FLOPs: the ceiling for a perfect grouped kernel.
    dl = lhs[: (m // e) * e].reshape(e, m // e, k)
    dense = lambda a, b, _gs: jnp.einsum("egk,ekn->egn", a, b)
    results = {}
    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.0)):
      fns = {"dense_einsum": (dense, dl, dout[: (m // e) * e].reshape(e, m // e, n))}
      fns.update({nm: (f, lhs, dout) for nm, f in impls.items()})
      times = {}
      for nm, (f, a, d) in fns.items():
        try:
          # back-to-back calls: a sub-millisecond kernel timed one synchronised call at a
          # time also measures the GPU clocking down between calls (H200, session 9: the
          # Mosaic GPU fwd read 0.714 ms that way, 0.365 ms pipelined)
          if mode == "fwd":
            fn = jax.jit(f)
            times[nm] = timing.time_pipelined(fn, a, rhs, gs, max_batch_s=0.3)
          else:
            times[nm] = timing.time_pipelined(_fwd_bwd(f), a, rhs, gs, d, max_batch_s=0.3)
        except Exception as err:  # report, keep benchmarking the others
          print(f"{name} {mode} {nm} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
      for nm, ms in times.items():
        ratios = {}
        for base in ("dense_einsum", "ragged_dot", "tokamax"):
          if base in times and base != nm:
            ratios[base] = times[base] / ms
        rows.append(timing.Row(f"gmm {mode}", label, nm, ms, tflops=mult * flops / ms / 1e9,
                               ratios=ratios))
      results[mode] = times
    rows += _tgmm_rows(label, lhs, dout, gs, dl, dout[: (m // e) * e].reshape(e, m // e, n),
                       flops)
  return rows


def _tgmm_rows(label, lhs, dout, gs, dense_lhs, dense_dout, flops):
  """The backward's d rhs alone (tgmm: [m, k] x [m, n] -> [e, k, n]) of each GPU kernel that
  has one, against the dense einsum of the same work."""
  fns = {"dense_einsum": (lambda a, d, _gs: jnp.einsum("egk,egn->ekn", a, d),
                          dense_lhs, dense_dout)}
  for nm in ("pallas_triton", "pallas_mosaic_gpu"):
    if nm in gmm_op.implementations():
      fns[nm] = ((lambda impl: lambda a, d, g: gmm_op.tgmm(a, d, g, implementation=impl))(nm),
                 lhs, dout)
  times = {}
  for nm, (f, a, d) in fns.items():
    try:
      times[nm] = timing.time_pipelined(jax.jit(f), a, d, gs, max_batch_s=0.3)
    except Exception as err:  # report, keep benchmarking the others
      print(f"tgmm {nm} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
  return [timing.Row("tgmm (d rhs)", label, nm, ms, tflops=flops / ms / 1e9,
                     ratios={"dense_einsum": times["dense_einsum"] / ms}
                     if "dense_einsum" in times and nm != "dense_einsum" else {})
          for nm, ms in times.items()]


def sweep(shape_names=("moe_e64_balanced",), dtype=jnp.bfloat16, out_json=None):
  """Times the Triton kernels over a grid of tiles; prints the best per product and writes
  the best gmm and tgmm fields to out_json (read by run() through GMM_TUNED_CONFIG)."""
  best_fields = {}
  base = GmmBlockConfig.for_device(_backend.device_kind(), _backend.platform())
  gmm_grid = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
              for bm, bn, bk, w, s in [
                  (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                  (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                  (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 4),
                  (128, 256, 32, 8, 5)]]
  tgmm_grid = [dict(tgmm_block_m=bm, tgmm_block_k=bk, tgmm_block_n=bn, tgmm_num_warps=w,
                    tgmm_num_stages=s)
               for bm, bk, bn, w, s in [
                   (64, 128, 128, 8, 4), (32, 128, 128, 4, 4), (64, 128, 128, 4, 3),
                   (64, 128, 256, 8, 3), (128, 128, 128, 8, 3), (32, 128, 256, 8, 4),
                   (64, 256, 128, 8, 3), (32, 64, 128, 4, 4)]]
  from ops.gmm import pallas_triton
  for name, m, k, n, e, routing in gmm_shapes.BENCH:
    if name not in shape_names:
      continue
    lhs, rhs, dout, gs = _inputs(m, k, n, e, routing, dtype)
    flops = 2.0 * m * k * n
    for label, transpose, a, b in (("gmm", False, lhs, rhs),
                                   ("gmm_dlhs", True, dout, jnp.swapaxes(rhs, 1, 2))):
      res = []
      for kw in gmm_grid:
        cfg = base.replace(**kw)
        f = jax.jit(lambda x, y, g, cfg=cfg, t=transpose: pallas_triton.gmm(
            x, y, g, out_dtype=dtype, transpose_rhs=t, interpret=False, config=cfg))
        try:
          ms = timing.time_pipelined(f, a, b, gs, max_batch_s=0.3)
          res.append((ms, kw))
          print(f"sweep {name} {label} {kw}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s",
                flush=True)
        except Exception as err:
          print(f"sweep {name} {label} {kw} failed: {type(err).__name__}: {str(err)[:200]}")
      if res:
        best = min(res, key=lambda r: r[0])
        if label == "gmm":
          best_fields.update(best[1])
        print(f"BEST {name} {label}: {best[1]} {best[0]:.3f} ms "
              f"{flops / best[0] / 1e9:.0f} TFLOP/s", flush=True)
    res = []
    for kw in tgmm_grid:
      cfg = base.replace(**kw)
      f = jax.jit(lambda x, y, g, cfg=cfg: pallas_triton.tgmm(
          x, y, g, out_dtype=dtype, interpret=False, config=cfg))
      try:
        # back-to-back like run(): one synchronised call per timing ranked two tgmm tiles
        # in the opposite order (session 15)
        ms = timing.time_pipelined(f, lhs, dout, gs, max_batch_s=0.3)
        res.append((ms, kw))
        print(f"sweep {name} tgmm {kw}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
      except Exception as err:
        print(f"sweep {name} tgmm {kw} failed: {type(err).__name__}: {str(err)[:200]}")
    if res:
      best = min(res, key=lambda r: r[0])
      best_fields.update(best[1])
      print(f"BEST {name} tgmm: {best[1]} {best[0]:.3f} ms {flops / best[0] / 1e9:.0f} TFLOP/s",
            flush=True)
  if out_json and best_fields:
    import json
    with open(out_json, "w") as f:
      json.dump(best_fields, f)


if __name__ == "__main__":
  if "--sweep" in sys.argv:
    sweep(out_json=os.environ.get("GMM_TUNED_CONFIG"))
  else:
    print(timing.format_table(run(), "gmm"))
