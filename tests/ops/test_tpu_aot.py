"""Every Pallas TPU kernel in ops/ lowers (Mosaic) and compiles for real TPU chips.

No TPU is needed: with libtpu installed, jax.experimental.topologies describes the chips of a
TPU slice and `jax.jit(f).lower(...).compile()` runs the TPU compiler on this CPU host
(tests/conftest.py skips these tests when libtpu is absent; install with pip install -e .[tpu]).
Each kernel is compiled on one chip of a v5e, v6e and v5p topology with its default block sizes
for that chip, forward and backward, over the op's `ci` shape set, with ops tracing for the
chip (ops._backend.target) so nothing is interpreted.

A kernel that declines a shape with UnsupportedError is within the ops contract when dispatch
then falls through: that case compiles ("pallas_tpu", "xla") instead and is reported as a skip
naming the kernel's reason. A Mosaic lowering or compile error fails the test.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import _backend

pytestmark = pytest.mark.tpu_aot

TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1")
MOSAIC_CALL = "tpu_custom_call"  # the custom-call target of a compiled Mosaic kernel


@functools.lru_cache(maxsize=None)
def _chip(topology: str):
  import os
  # libtpu's per-host lockfile would stop a second process (xdist worker) from loading it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]


def _compile(fn, args, device):
  sh = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in args]
  # Pallas' Mosaic lowering asks the ambient mesh for the chip (tpu_info.get_tpu_info); without
  # one it asks the default device, which is the CPU here.
  mesh = jax.sharding.Mesh(np.array([device]), ("chip",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  jax.clear_caches()  # traces made for the chip must not leak into CPU tests (and back)
  try:
    with _backend.target(device.platform, device.device_kind), set_mesh(mesh):
      return jax.jit(fn).lower(*args).compile()
  finally:
    jax.clear_caches()


def check_compiles(topology: str, make_fn, args):
  """make_fn(implementation) -> f(*args). Compiles the pallas_tpu version for one chip."""
  dev = _chip(topology)
  try:
    compiled = _compile(make_fn("pallas_tpu"), args, dev)
  except NotImplementedError as e:
    if "cannot be automatically partitioned" in str(e) or "Mosaic" in str(e):
      raise
    # The kernel declined (UnsupportedError at trace time): dispatch must fall through.
    compiled = _compile(make_fn(("pallas_tpu", "xla")), args, dev)
    assert compiled is not None
    pytest.skip(f"kernel declines on {dev.device_kind}, falls through to xla: {e}")
  assert MOSAIC_CALL in compiled.as_text(), "no Mosaic kernel in the compiled program"
  return compiled


def _s(shape, dtype):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _grad_of(fn, argnums):
  """Sum of every float output, differentiated w.r.t. argnums (forward + backward kernels)."""
  def loss(*args):
    out = fn(*args)
    leaves = [x for x in jax.tree.leaves(out) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)
  return jax.grad(loss, argnums=argnums)


# ----------------------------------------------------------------------------- attention

def _attention_cases():
  from ops.attention.shapes import SHAPES
  for s in SHAPES["ci"]:
    for dtype in ("bfloat16", "float32"):
      yield pytest.param(s, dtype, id=f"{s.name.replace(' ', '_')}-{dtype}")


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", ["pallas_tpu", "splash"])
@pytest.mark.parametrize("shape,dtype", list(_attention_cases()))
def test_attention(topology, direction, impl, shape, dtype):
  import ops.attention
  if impl not in ops.attention.implementations():
    pytest.skip(f"{impl} not registered in this jax")
  s = shape
  args = [_s((s.batch, s.seq, s.heads, s.head_dim), dtype),
          _s((s.batch, s.seq, s.kv_heads, s.head_dim), dtype),
          _s((s.batch, s.seq, s.kv_heads, s.head_dim), dtype)]

  def make(implementation):
    if implementation == "pallas_tpu":
      implementation = impl
    elif isinstance(implementation, tuple):
      implementation = (impl, "xla")
    f = functools.partial(ops.attention.attention, causal=s.causal, window=s.window,
                          implementation=implementation, interpret=False)
    return f if direction == "fwd" else _grad_of(f, (0, 1, 2))

  check_compiles(topology, make, args)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_attention_segments_soft_cap(topology):
  """The model's training call: packed segments, causal, soft cap (fwd + bwd)."""
  import ops.attention
  b, t, h, kv, d = 2, 256, 4, 2, 128
  args = [_s((b, t, h, d), "bfloat16"), _s((b, t, kv, d), "bfloat16"),
          _s((b, t, kv, d), "bfloat16"), _s((b, t), "int32")]

  def make(implementation):
    def f(q, k, v, seg):
      return ops.attention.attention(q, k, v, causal=True, q_segment_ids=seg,
                                     kv_segment_ids=seg, soft_cap=30.0,
                                     implementation=implementation, interpret=False)
    return _grad_of(f, (0, 1, 2))

  check_compiles(topology, make, args)


# ----------------------------------------------------------------------------- gmm

@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("direction", ["fwd", "bwd", "tgmm"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in
                                  __import__("ops.gmm.shapes", fromlist=["CI"]).CI])
def test_gmm(topology, direction, dtype, case):
  import ops.gmm
  _, m, k, n, e, _ = case
  if direction == "tgmm":
    args = [_s((m, k), dtype), _s((m, n), dtype), _s((e,), "int32")]
  else:
    args = [_s((m, k), dtype), _s((e, k, n), dtype), _s((e,), "int32")]

  def make(implementation):
    op = ops.gmm.tgmm if direction == "tgmm" else ops.gmm.gmm
    f = lambda a, b, gs: op(a, b, gs, implementation=implementation, interpret=False)
    return _grad_of(f, (0, 1)) if direction == "bwd" else f

  check_compiles(topology, make, args)


# ----------------------------------------------------------------------------- scan

@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", [pytest.param(c, id="B{}_T{}_C{}_{}_{}".format(
    *c[:4], "a_per_channel" if c[4] else "a_full")) for c in
    __import__("ops.scan.shapes", fromlist=["SHAPES"]).SHAPES["ci"]])
def test_scan(topology, direction, reverse, case):
  import ops.scan
  b, t, c, dtype, per_channel = case
  args = [_s((c,) if per_channel else (b, t, c), dtype), _s((b, t, c), dtype),
          _s((b, c), "float32")]

  def make(implementation):
    f = functools.partial(ops.scan.linear_scan, reverse=reverse, implementation=implementation,
                          interpret=False)
    return f if direction == "fwd" else _grad_of(f, (0, 1, 2))

  check_compiles(topology, make, args)


# ----------------------------------------------------------------------------- lif

@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("reset", ["hard", "subtract"])
@pytest.mark.parametrize("case", [pytest.param(c, id="B{}_T{}_C{}_{}".format(*c)) for c in
                                  __import__("ops.lif.shapes", fromlist=["SHAPES"]).SHAPES["ci"]])
def test_lif(topology, direction, reset, case):
  import ops.lif
  b, t, c, dtype = case
  args = [_s((b, t, c), dtype), _s((b, c), "float32")]

  def make(implementation):
    f = functools.partial(ops.lif.lif, reset=reset, implementation=implementation,
                          interpret=False)
    return f if direction == "fwd" else _grad_of(f, (0, 1))

  check_compiles(topology, make, args)


# ----------------------------------------------------------------------------- nsa

def _nsa_registered(registry) -> bool:
  return "pallas_tpu" in registry.names


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("piece", ["compressed_fwd", "compressed_bwd", "select_blocks",
                                   "selected_fwd", "selected_bwd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_nsa(topology, piece, dtype):
  from ops.nsa import api
  from ops.nsa.config import NSAConfig
  from ops.nsa.shapes import SHAPES
  registry = {"compressed": api._CMP, "select": api._SCORES, "selected": api._SEL}[
      piece.split("_")[0]]
  if not _nsa_registered(registry):
    pytest.skip("ops/nsa has no pallas_tpu implementation registered (ops/nsa/pallas_tpu.py)")
  (s,) = SHAPES["ci"][:1]
  cfg = NSAConfig(window=64, n_select=4)
  n_cmp = (s.seq - cfg.block_len) // cfg.stride + 1
  q = _s((s.batch, s.seq, s.heads, s.head_dim), dtype)
  kc = _s((s.batch, n_cmp, s.kv_heads, s.head_dim), dtype)
  kv = _s((s.batch, s.seq, s.kv_heads, s.head_dim), dtype)
  cmp = lambda impl: functools.partial(api.compressed_attention, block_len=cfg.block_len,
                                       stride=cfg.stride, implementation=impl, interpret=False)
  _, lse = jax.eval_shape(cmp("xla"), q, kc, kc)
  idx = jax.eval_shape(functools.partial(api.select_blocks, cfg=cfg, implementation="xla"),
                       q, kc, lse)
  if piece.startswith("compressed"):
    args, make = [q, kc, kc], cmp
    if piece.endswith("bwd"):
      make = lambda impl: _grad_of(cmp(impl), (0, 1, 2))
  elif piece == "select_blocks":
    args = [q, kc, _s(lse.shape, lse.dtype)]
    make = lambda impl: functools.partial(api.select_blocks, cfg=cfg, implementation=impl,
                                          interpret=False)
  else:
    args = [q, kv, kv, _s(idx.shape, idx.dtype)]
    sel = lambda impl: functools.partial(api.selected_attention, select_len=cfg.select_len,
                                         implementation=impl, interpret=False)
    make = sel if piece.endswith("fwd") else (lambda impl: _grad_of(sel(impl), (0, 1, 2)))
  check_compiles(topology, make, args)



# The bf16 shape on every topology; the f32 one (same kernels, another dtype) on v5e only by
# default, the other two in the slow run (~30 s of TPU compile each in CI).
@pytest.mark.parametrize("topology,b,t,h,kv,d,dtype,seg", [
    *(pytest.param(topo, 1, 1000, 16, 1, 128, "bfloat16", True,
                   id=f"T1000_H16_KV1_D128-bf16-segments-{topo}") for topo in TOPOLOGIES),
    *(pytest.param(topo, 2, 777, 8, 2, 64, "float32", False, id=f"B2_T777_H8_KV2_D64-f32-{topo}",
                   marks=() if topo == TOPOLOGIES[0] else (pytest.mark.slow,))
      for topo in TOPOLOGIES),
])
def test_nsa_full_op(topology, b, t, h, kv, d, dtype, seg):
  """The whole NSA op (paper block sizes, GQA group 16 / 4, odd lengths) fwd + bwd: every
  branch's Mosaic kernels in one program, no fall-through to xla."""
  from ops.nsa import api
  from ops.nsa.config import NSAConfig
  if not _nsa_registered(api._SEL):
    pytest.skip("ops/nsa has no pallas_tpu implementation registered (ops/nsa/pallas_tpu.py)")
  cfg = NSAConfig()
  nc = cfg.n_cmp(t)
  args = ([_s((b, t, h, d), dtype)] + [_s((b, nc, kv, d), dtype)] * 2
          + [_s((b, t, kv, d), dtype)] * 4 + [_s((b, t, h, 3), dtype)]
          + ([_s((b, t), "int32")] if seg else []))

  def make(impl):
    f = lambda *a: api.nsa(*a[:8], cfg=cfg, q_segment_ids=a[8] if seg else None,
                           implementation=impl, interpret=False)
    return _grad_of(f, tuple(range(8)))

  compiled = check_compiles(topology, make, args)
  text = compiled.as_text()
  for name in ("nsa_selected_fwd_tpu", "nsa_selected_dq_tpu", "nsa_selected_dkv_tpu",
               "nsa_selection_scores_tpu"):
    assert name in text, f"{name} missing from the compiled program"


@pytest.mark.parametrize("topology", TOPOLOGIES[:1])
def test_nsa_selected_long(topology):
  """Paper GQA shape at 8k, fwd + bwd: the scalar-prefetch arrays exceed one call's SMEM budget,
  so the kernels run over query chunks (fori_loop of aliased calls)."""
  from ops.nsa import api
  from ops.nsa.config import NSABlockConfig
  if not _nsa_registered(api._SEL):
    pytest.skip("ops/nsa has no pallas_tpu implementation registered (ops/nsa/pallas_tpu.py)")
  b, t, h, kv, d, n = 1, 8192, 64, 4, 128, 16
  args = [_s((b, t, h, d), "bfloat16"), _s((b, t, kv, d), "bfloat16"),
          _s((b, t, kv, d), "bfloat16"), _s((b, t, kv, n), "int32")]
  bcfg = NSABlockConfig.for_device(_chip(topology).device_kind)
  assert b * kv * min(bcfg.tpu_block_q * n, t // 64) * (t // bcfg.tpu_block_q) > \
      bcfg.tpu_prefetch_max, "shape no longer exercises the chunked path"

  def make(impl):
    f = functools.partial(api.selected_attention, select_len=64, implementation=impl,
                          interpret=False)
    return _grad_of(f, (0, 1, 2))

  compiled = check_compiles(topology, make, args)
  assert "nsa_selected_dkv_tpu" in compiled.as_text()
