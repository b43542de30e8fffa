"""NSA benchmark: nsa (pallas_triton) vs cuDNN full causal attention, fwd and fwd+bwd, plus
per-branch forward times and decode (batch 8) against full-attention decode on the same cache.

  python experiments/bench_ops.py --op=nsa
  python experiments/bench_ops.py --op=nsa --shapes=bench_decode   # decode rows only
  python experiments/bench_ops.py --op=nsa --shapes=bench_smooth   # correlated neighbours

A shape set whose name ends in "_decode" runs only the decode rows, at every shape of the set;
any other set runs decode at its longest shape (unless its queries are smoothed: decode draws
its own inputs), then the training rows. The selection row notes how many of each query's
blocks the query before it also chose (random queries share few at long lengths, which is the
worst case for query tiles; the smoothed sets show the tiles where neighbours agree).
"""
from __future__ import annotations

import functools
import traceback

import jax
import jax.numpy as jnp

from experiments.bench import timing
from ops import nsa as nsa_op
from ops.nsa import decode as nsa_decode_mod
from ops.nsa.config import NSAConfig
from ops.nsa.shapes import SHAPES


def make_inputs(s, cfg, dtype):
  """NSA op inputs for shape s (ops.nsa.shapes.NSAShape): (q, k_cmp, v_cmp, k_slc, v_slc,
  k_win, v_win, gates); also used by experiments/tune_ops.py."""
  ks = jax.random.split(jax.random.key(0), 9)
  b, t, h, hk, d = s.batch, s.seq, s.heads, s.kv_heads, s.head_dim
  n = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * 0.5).astype(dtype)
  if s.q_smooth:
    w = s.q_smooth
    c = jnp.cumsum(jax.random.normal(ks[0], (b, t + w, h, d), jnp.float32), axis=1)
    q = ((c[:, w:] - c[:, :-w]) * (0.5 / w ** 0.5)).astype(dtype)   # same variance as i.i.d.
  else:
    q = n(ks[0], (b, t, h, d))
  kc, vc = n(ks[1], (b, cfg.n_cmp(t), hk, d)), n(ks[2], (b, cfg.n_cmp(t), hk, d))
  raw = [n(ks[i], (b, t, hk, d)) for i in range(3, 7)]
  gates = jax.nn.sigmoid(jax.random.normal(ks[7], (b, t, h, 3))).astype(dtype)
  return (q, kc, vc, *raw, gates)


def neighbour_overlap(block_idx) -> float:
  """Fraction of the selected blocks [b, t, kvh, n] (-1 = none) of each query that the query
  before it also selected: how much a tile of neighbouring queries shares."""
  a, p = block_idx[:, 1:], block_idx[:, :-1]
  shared = jnp.any((a[..., :, None] == p[..., None, :]) & (a[..., :, None] >= 0), axis=-1)
  return float(jnp.sum(shared) / jnp.maximum(jnp.sum(a >= 0), 1))


def _time(fn, *args, iters=5):
  return timing.time_fn(fn, *args, warmup=1, iters=iters)


def run(shapes="bench", dtype="bfloat16", ceilings=None):
  del ceilings
  dtype = jnp.dtype(dtype)
  cfg = NSAConfig()
  impl = "pallas_triton" if jax.default_backend() == "gpu" else "xla"
  rows = []
  if shapes.endswith("_decode"):
    for s in SHAPES[shapes]:
      _decode_rows(shapes, dtype, cfg, rows, shape=s)
    return rows
  if not any(s.q_smooth for s in SHAPES[shapes]):
    _decode_rows(shapes, dtype, cfg, rows)
  for s in SHAPES[shapes]:
    _train_rows(s, cfg, dtype, impl, rows)     # its arrays are freed before the next shape
  return rows


def _train_rows(s, cfg, dtype, impl, rows):
  """cuDNN full attention vs NSA fwd and fwd+bwd at shape s, plus the branch breakdown."""
  args = make_inputs(s, cfg, dtype)
  q, kc, vc, ks, vs, kw, vw, gates = args
  iters = 5 if s.seq >= 32768 else 10

  def row(op, ms, base=None, note=""):
    r = timing.Row(op, s.name, impl if op.startswith("nsa") else "cudnn", ms, note=note)
    if base:
      r.ratios["cudnn"] = base / ms
    rows.append(r)
    print(timing.format_table([r]), flush=True)

  def attempt(label, fn):
    try:
      return fn()
    except Exception as e:  # report and continue with the other rows
      traceback.print_exc()
      rows.append(timing.Row(label, s.name, impl, float("nan"), note=f"failed: {e!r}"[:120]))
      return None

  base_f = base_b = None
  if jax.default_backend() == "gpu":
    full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="cudnn")
    f = jax.jit(full)
    fb = jax.jit(jax.grad(lambda q, k, v: full(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)))
    base_f = attempt("cudnn fwd", lambda: _time(f, q, ks, vs, iters=iters))
    base_b = attempt("cudnn fwd+bwd", lambda: _time(fb, q, ks, vs, iters=iters))
    if base_f:
      row("cudnn fwd", base_f)
    if base_b:
      row("cudnn fwd+bwd", base_b)

  fwd = jax.jit(functools.partial(nsa_op.nsa, cfg=cfg, implementation=impl))
  loss = lambda *a: nsa_op.nsa(*a, cfg=cfg, implementation=impl).astype(jnp.float32).sum()
  bwd = jax.jit(jax.grad(loss, argnums=tuple(range(8))))
  ms = attempt("nsa fwd", lambda: _time(fwd, *args, iters=iters))
  if ms:
    row("nsa fwd", ms, base_f)
  # branch breakdown (forward)
  cmp_f = jax.jit(lambda q, kc, vc: nsa_op.compressed_attention(
      q, kc, vc, block_len=cfg.block_len, stride=cfg.stride, implementation=impl))
  ms = attempt("nsa.cmp fwd", lambda: _time(cmp_f, q, kc, vc, iters=iters))
  if ms:
    row("nsa.cmp fwd", ms)
  lse = attempt("lse", lambda: cmp_f(q, kc, vc)[1])
  if lse is not None:
    sel_f = jax.jit(lambda q, kc, lse: nsa_op.select_blocks(q, kc, lse, cfg=cfg,
                                                            implementation=impl))
    ms = attempt("nsa.select", lambda: _time(sel_f, q, kc, lse, iters=iters))
    idx = sel_f(q, kc, lse)
    if ms:
      row("nsa.select", ms, note=f"neighbour block overlap {neighbour_overlap(idx):.0%}")
    slc_f = jax.jit(lambda q, k, v, i: nsa_op.selected_attention(
        q, k, v, i, select_len=cfg.select_len, implementation=impl))
    ms = attempt("nsa.slc fwd", lambda: _time(slc_f, q, ks, vs, idx, iters=iters))
    if ms:
      row("nsa.slc fwd", ms)
    slc_b = jax.jit(jax.grad(lambda q, k, v, i: slc_f(q, k, v, i)[0].astype(jnp.float32).sum(),
                             argnums=(0, 1, 2)))
    ms = attempt("nsa.slc fwd+bwd", lambda: _time(slc_b, q, ks, vs, idx, iters=iters))
    if ms:
      row("nsa.slc fwd+bwd", ms)
    if impl == "pallas_triton":
      _query_tile_rows(slc_f(q, ks, vs, idx)[0], q, ks, vs, idx, cfg, iters, row, attempt)
  if jax.default_backend() == "gpu":
    from ops.attention import attention
    win_f = jax.jit(lambda q, k, v: attention(q, k, v, causal=True, window=cfg.window))
    ms = attempt("window fwd", lambda: _time(win_f, q, kw, vw, iters=iters))
    if ms:
      row("nsa.win fwd", ms)
  ms = attempt("nsa fwd+bwd", lambda: _time(bwd, *args, iters=iters))
  if ms:
    row("nsa fwd+bwd", ms, base_b)


def _query_tile_rows(o_ref, q, k, v, idx, cfg, iters, row, attempt):
  """The selected branch with qt queries per program in all its kernels (NSABlockConfig
  sel_block_q, sel_dq_block_q, sel_dkv_block_q; the device default may tile only the
  backward), fwd and fwd+bwd, on the blocks the default path chose; the note gives
  max |o - o of the default|."""
  from ops.nsa.config import default_block_config
  for qt in (1, 4, 8):
    bcfg = default_block_config().replace(sel_block_q=qt, sel_dq_block_q=qt, sel_dkv_block_q=qt)
    f = jax.jit(lambda q, k, v, i, bcfg=bcfg: nsa_op.selected_attention(
        q, k, v, i, select_len=cfg.select_len, implementation="pallas_triton", config=bcfg))
    fb = jax.jit(jax.grad(lambda q, k, v, i: f(q, k, v, i)[0].astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)))
    label = f"nsa.slc fwd [all kernels {qt} queries per step]"
    diff = attempt(label, lambda: float(jnp.max(jnp.abs(
        f(q, k, v, idx)[0].astype(jnp.float32) - o_ref.astype(jnp.float32)))))
    if diff is None:
      continue
    ms = attempt(label, lambda: _time(f, q, k, v, idx, iters=iters))
    if ms:
      row(label, ms, note=f"max |o - default o| {diff:.2e}")
    label = f"nsa.slc fwd+bwd [all kernels {qt} queries per step]"
    ms = attempt(label, lambda: _time(fb, q, k, v, idx, iters=iters))
    if ms:
      row(label, ms)


def _decode_rows(shapes, dtype, cfg, rows, shape=None):
  """Decode at `shape` (default: the set's longest length), batch s.decode_batch: full-attention
  decode (ops.attention default, and cuDNN on GPU) vs NSA decode "xla" and "pallas_triton" on
  the same cache. GB/s = bytes each one must read (full: the whole cache up to the length;
  NSA: the valid compressed cache + selected blocks + window) over its time. Two timings, each
  with ratios against the baselines timed the same way: "in loop" = per step of 64 steps in
  one jitted fori_loop (timing.time_in_loop: what jaxlm.generate's lax.scan sees, no host
  dispatch), "back-to-back" = per call of separately dispatched calls (timing.time_pipelined:
  a Python loop of jitted steps, host dispatch included when it is longer than the device
  work); the note gives one synchronised call.
  """
  s = shape or max(SHAPES[shapes], key=lambda x: x.seq)
  b, t, h, hk, d = s.decode_batch, s.seq, s.heads, s.kv_heads, s.head_dim
  keys = jax.random.split(jax.random.key(1), 8)
  n = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  qd = n(keys[0], (b, h, d))
  kcc, vcc = n(keys[1], (b, cfg.n_cmp(t), hk, d)), n(keys[2], (b, cfg.n_cmp(t), hk, d))
  kcache, vcache = n(keys[3], (b, t, hk, d)), n(keys[4], (b, t, hk, d))
  gd = jax.nn.sigmoid(jax.random.normal(keys[5], (b, h, 3))).astype(dtype)
  lengths = jnp.full((b,), t, jnp.int32)
  name = f"decode B{b} cache {t} H{h}/KV{hk} D{d}"
  item = jnp.dtype(dtype).itemsize
  full_bytes = b * t * hk * 2 * d * item
  nsa_bytes = b * hk * 2 * d * item * (cfg.n_cmp(t) + min(t, cfg.n_select * cfg.select_len)
                                       + min(t, cfg.window))
  new = []
  from ops.attention import decode_attention
  # Two full-attention baselines over the same cache: ours (the flash-decoding kernel on GPU)
  # and cuDNN, the one issue #5's 8x target was measured against.
  baselines = {"ops.attention default":
               lambda q, k, v, l: decode_attention(q[:, None], k, v, l)[:, 0]}
  if jax.default_backend() == "gpu":
    baselines["cudnn"] = lambda q, k, v, l: jax.nn.dot_product_attention(
        q[:, None], k, v, key_value_seq_lengths=l, implementation="cudnn")[:, 0]
  timers = {"in loop": lambda f, *a: timing.time_in_loop(f, *a),
            "back-to-back": lambda f, *a: timing.time_pipelined(jax.jit(f), *a)}
  base_ms = {}
  for label, fn in baselines.items():
    try:
      sync_f = _time(jax.jit(fn), qd, kcache, vcache, lengths, iters=20)
      for mode, timer in timers.items():
        ms_f = timer(fn, qd, kcache, vcache, lengths)
        base_ms[f"full decode ({label}, {mode})"] = ms_f
        new.append(timing.Row("full decode", name, f"{label}, {mode}", ms_f,
                              gbs=full_bytes / (ms_f * 1e-3) / 1e9,
                              note=f"synchronised call {sync_f:.3f} ms"))
    except Exception as e:
      traceback.print_exc()
      new.append(timing.Row("full decode", name, label, float("nan"), note=repr(e)[:120]))
  # Same cache for every branch (the layer may share or separate them; traffic is the same).
  for impl, label in (("xla", "xla gathers"), ("pallas_triton", "pallas_triton")):
    dec = functools.partial(nsa_decode_mod.nsa_decode, cfg=cfg, implementation=impl)
    dargs = (qd, kcc, vcc, kcache, vcache, kcache, vcache, gd, lengths)
    try:
      sync_n = _time(jax.jit(dec), *dargs, iters=20)
      for mode, timer in timers.items():
        ms_n = timer(dec, *dargs)
        r = timing.Row("nsa decode", name, f"{label}, {mode}", ms_n,
                       gbs=nsa_bytes / (ms_n * 1e-3) / 1e9,
                       note=f"synchronised call {sync_n:.3f} ms")
        r.ratios.update({k: ms_b / ms_n for k, ms_b in base_ms.items() if k.endswith(f"{mode})")})
        new.append(r)
    except Exception as e:
      traceback.print_exc()
      new.append(timing.Row("nsa decode", name, label, float("nan"), note=repr(e)[:120]))
  for r in new:
    print(timing.format_table([r]), flush=True)
  rows.extend(new)
