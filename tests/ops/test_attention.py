"""Tests of ops.attention: every implementation against the f32 HIGHEST reference."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import ops.attention as A
from ops import _backend
from ops.attention import reference
from ops.attention.config import AttentionBlockConfig
from tests.ops import op_testing as ot

F32, BF16 = jnp.float32, jnp.bfloat16


def _naive(q, k, v, *, causal, window, sinks, qseg, kvseg, valid, scale, soft_cap, q_offset):
  """Loop-by-loop numpy attention: an independent check of the reference's masking."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  lk, hk = k.shape[1], k.shape[2]
  o = np.zeros((b, lq, h, v.shape[-1]))
  lse = np.full((b, h, lq), -np.inf)
  for bi in range(b):
    for hi in range(h):
      kh = hi // (h // hk)
      for i in range(lq):
        pos = i + q_offset
        js = []
        for j in range(lk):
          ok = (not causal or j <= pos)
          if window is not None:
            ok = ok and (j > pos - window or j < sinks)
          if qseg is not None:
            ok = ok and qseg[bi, i] == kvseg[bi, j]
          if valid is not None:
            ok = ok and bool(valid[bi, j])
          if ok:
            js.append(j)
        if not js:
          continue
        s = np.array([q[bi, i, hi] @ k[bi, j, kh] for j in js]) * scale
        if soft_cap is not None:
          s = soft_cap * np.tanh(s / soft_cap)
        m = s.max()
        p = np.exp(s - m)
        o[bi, i, hi] = (p[:, None] * v[bi, js, kh]).sum(0) / p.sum()
        lse[bi, hi, i] = m + np.log(p.sum())
  return o, lse


# name -> (b, lq, lk, h, hk, d, dv, options)
CASES = {
    "causal": (2, 33, 33, 2, 2, 64, 64, dict(causal=True)),
    "noncausal": (1, 20, 20, 2, 2, 64, 64, dict()),
    "gqa2": (1, 24, 24, 4, 2, 64, 64, dict(causal=True)),
    "gqa4_mqa": (1, 17, 17, 4, 1, 64, 64, dict(causal=True)),
    # a group past the Triton dk/dv kernel's unroll limit (it loops over the heads instead)
    "gqa16_segments": (1, 37, 37, 16, 1, 64, 64, dict(causal=True, segments=True)),
    "window": (1, 40, 40, 2, 1, 64, 64, dict(causal=True, window=9)),
    "window_sinks": (1, 40, 40, 2, 2, 64, 64, dict(causal=True, window=7, sinks=3)),
    "segments": (2, 30, 30, 2, 2, 64, 64, dict(causal=True, segments=True)),
    "kv_valid": (2, 19, 19, 2, 2, 64, 64, dict(kv_valid=True)),
    "soft_cap": (1, 21, 21, 2, 2, 64, 64, dict(causal=True, soft_cap=2.0)),
    "chunked_prefill": (1, 7, 40, 4, 2, 64, 64, dict(causal=True)),
    "q_longer": (1, 30, 9, 2, 2, 64, 64, dict(causal=True, q_offset=0)),
    "len1": (2, 1, 1, 2, 2, 64, 64, dict(causal=True)),
    "len100": (1, 100, 100, 2, 1, 64, 64, dict(causal=True, window=40, sinks=2)),
    "d96": (1, 18, 18, 2, 2, 96, 96, dict(causal=True)),
    "d192_dv128": (1, 18, 18, 2, 1, 192, 128, dict(causal=True)),
    "fully_masked": (2, 12, 12, 2, 2, 64, 64, dict(masked_rows=True)),
    # Several 128-tiles (the TPU kernel's minimum) with a ragged tail.
    "multi_block": (1, 300, 300, 2, 1, 64, 64, dict(causal=True, window=130, sinks=5,
                                                   segments=True)),
}


# (case, dtype) pairs of the default (fast) run; the rest of the matrix is marked slow
# (interpret mode on 2 CPU cores is the bottleneck). The GPU run (-m gpu) runs everything.
FAST = {("causal", "f32"), ("gqa4_mqa", "bf16"), ("gqa16_segments", "f32"), ("window_sinks", "f32"),
        ("fully_masked", "f32"), ("d192_dv128", "f32"), ("chunked_prefill", "f32"),
        ("kv_valid", "f32"), ("soft_cap", "bf16"), ("len100", "bf16"), ("multi_block", "f32")}
DECODE_FAST = {("plain", "f32"), ("window_sinks_cap", "bf16")}


def _params(cases, fast):
  out = []
  for c in cases:
    for name, dt in (("f32", F32), ("bf16", BF16)):
      marks = () if (c, name) in fast else (pytest.mark.slow,)
      out.append(pytest.param(c, dt, id=f"{c}-{name}", marks=marks))
  return out


def make_inputs(case, dtype, seed=0):
  b, lq, lk, h, hk, d, dv, opts = CASES[case]
  ks = jax.random.split(jax.random.key(seed), 8)
  q = ot.normal(ks[0], (b, lq, h, d), dtype)
  k = ot.normal(ks[1], (b, lk, hk, d), dtype)
  v = ot.normal(ks[2], (b, lk, hk, dv), dtype)
  kw = {n: opts[n] for n in ("causal", "window", "sinks", "soft_cap", "q_offset") if n in opts}
  if opts.get("segments"):
    kw["q_segment_ids"] = jnp.sort(jax.random.randint(ks[3], (b, lq), 0, 3), axis=1)
    kw["kv_segment_ids"] = kw["q_segment_ids"] if lq == lk else jnp.sort(
        jax.random.randint(ks[4], (b, lk), 0, 3), axis=1)
  if opts.get("kv_valid"):
    kw["kv_valid"] = jax.random.bernoulli(ks[5], 0.7, (b, lk))
  if opts.get("masked_rows"):
    # Batch 0: all keys invalid; batch 1: queries of segment 9 see no key of segment 9.
    kw["kv_valid"] = jnp.stack([jnp.zeros((lk,), bool), jnp.ones((lk,), bool)])
    kw["q_segment_ids"] = jnp.tile(jnp.where(jnp.arange(lq) < lq // 2, 0, 9), (b, 1))
    kw["kv_segment_ids"] = jnp.zeros((b, lk), jnp.int32)
    kw["causal"] = True
  return q, k, v, kw


def _loss_fn(fn, do, dlse):
  def loss(q, k, v):
    o, lse = fn(q, k, v)
    if lse is None:
      return jnp.sum(o.astype(jnp.float32) * do)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(lse * dlse)
  return loss


class AttentionTestBase:
  IMPLEMENTATION = "xla"
  INTERPRET = None
  CONFIG = None
  F32_TOL = None  # None: op_testing.TOL
  DTYPES = (F32, BF16)
  CASE_NAMES = tuple(CASES)
  GRAD_CASES = tuple(CASES)

  RETURNS_LSE = True

  def attn(self, q, k, v, **kw):
    if not self.RETURNS_LSE:
      o = A.attention(q, k, v, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET,
                      config=self.CONFIG, **kw)
      return o, None
    return A.attention(q, k, v, return_lse=True, implementation=self.IMPLEMENTATION,
                       interpret=self.INTERPRET, config=self.CONFIG, **kw)

  def tol(self, dtype, grad=False):
    base = ot.TOL[jnp.dtype(dtype).type]
    if dtype == F32 and self.F32_TOL is not None:
      base = self.F32_TOL
    return base * (ot.GRAD_FACTOR if grad else 1.0)

  @pytest.mark.parametrize("case,dtype", _params(CASES, FAST))
  def test_forward_and_grads(self, case, dtype):
    if case not in self.CASE_NAMES or dtype not in self.DTYPES:
      pytest.skip("case not in this subclass's set")
    q, k, v, kw = make_inputs(case, dtype)
    ref_fn = lambda q, k, v: reference.attention(
        q.astype(F32), k.astype(F32), v.astype(F32), **kw)
    o, lse = jax.jit(lambda q, k, v: self.attn(q, k, v, **kw))(q, k, v)
    o_ref, lse_ref = jax.jit(ref_fn)(q, k, v)
    assert o.shape == o_ref.shape and o.dtype == q.dtype
    if lse is None:  # implementation without lse: compare o (and grads through o) only
      lse = lse_ref
      assert not self.RETURNS_LSE
    assert lse.shape == lse_ref.shape and lse.dtype == F32
    ot.assert_close(o, o_ref, dtype, tol=self.tol(dtype), name="o")
    fin = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    ot.assert_close(np.where(fin, lse, 0), np.where(fin, lse_ref, 0), dtype,
                    tol=self.tol(dtype), name="lse")
    if not fin.all():  # fully masked query rows output exactly 0
      rows = ~fin.transpose(0, 2, 1)  # [b, q, h]
      assert np.all(np.asarray(o, np.float32)[rows] == 0)
    if case not in self.GRAD_CASES:
      return
    kd = jax.random.split(jax.random.key(7))
    do = ot.normal(kd[0], o.shape, F32)
    dlse = ot.normal(kd[1], lse.shape, F32) * (1.0 if self.RETURNS_LSE else 0.0)
    grads = jax.jit(jax.grad(_loss_fn(lambda *a: self.attn(*a, **kw), do, dlse),
                             argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.jit(jax.grad(_loss_fn(ref_fn, do, dlse), argnums=(0, 1, 2)))(q, k, v)
    for name, g, gr in zip("qkv", grads, grads_ref):
      assert g.dtype == dtype
      ot.assert_close(g, gr, dtype, tol=self.tol(dtype, grad=True), name=f"d{name}")

  DECODE_CASES = {
      "plain": (3, 1, 70, 4, 2, 64, dict()),
      "multi_token": (2, 4, 50, 4, 1, 64, dict()),
      "window_sinks_cap": (2, 3, 64, 2, 2, 64, dict(window=20, sinks=2, soft_cap=3.0)),
  }

  @pytest.mark.parametrize("case,dtype",
                           _params(("plain", "multi_token", "window_sinks_cap"), DECODE_FAST))
  def test_decode(self, case, dtype):
    if dtype not in self.DTYPES:
      pytest.skip("dtype not in this subclass's set")
    b, lq, max_len, h, hk, d, opts = self.DECODE_CASES[case]
    ks = jax.random.split(jax.random.key(3), 4)
    q = ot.normal(ks[0], (b, lq, h, d), dtype)
    kc = ot.normal(ks[1], (b, max_len, hk, d), dtype)
    vc = ot.normal(ks[2], (b, max_len, hk, d), dtype)
    lengths = jnp.array([max_len, lq, max_len // 2 + 1][:b], jnp.int32)
    o, lse = jax.jit(lambda *a: A.decode_attention(
        *a, return_lse=True, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET,
        config=self.CONFIG, **opts))(q, kc, vc, lengths)
    o_ref, lse_ref = jax.jit(lambda *a: reference.decode_attention(
        *(x.astype(F32) for x in a[:3]), a[3], **opts))(q, kc, vc, lengths)
    ot.assert_close(o, o_ref, dtype, tol=self.tol(dtype), name="o")
    ot.assert_close(lse, lse_ref, dtype, tol=self.tol(dtype), name="lse")
    # Same as full attention over each sequence's valid prefix (bottom-right aligned).
    full_fn = jax.jit(lambda q, k, v: reference.attention(
        q.astype(F32), k.astype(F32), v.astype(F32), causal=True, **opts)[0])
    for bi in range(b):
      n = int(lengths[bi])
      full = full_fn(q[bi:bi + 1], kc[bi:bi + 1, :n], vc[bi:bi + 1, :n])
      ot.assert_close(o[bi:bi + 1], full, dtype, tol=self.tol(dtype), name=f"o[{bi}] vs full")

  # layer-stacked caches: (layers, batch, q_len, max_len, heads, kv_heads, head_dim). 70 rows
  # end in a clamped, overlapping block; 9 rows and head_dim 48 take the padded-slice path.
  STACKED_CASES = {"rows70": (3, 2, 1, 70, 4, 2, 64), "rows9": (2, 2, 2, 9, 2, 1, 64),
                   "d48": (2, 1, 1, 40, 4, 2, 48)}

  @pytest.mark.parametrize("case", ["rows70", "rows9", "d48"])
  def test_decode_stacked(self, case):
    """layer= on [layers, ...] caches equals the call on that layer's slice, for a traced
    layer (inside jit, as a scan over layers passes it) and a static one."""
    n_layers, b, lq, max_len, h, hk, d = self.STACKED_CASES[case]
    dtype = self.DTYPES[-1]
    ks = jax.random.split(jax.random.key(5), 3)
    q = ot.normal(ks[0], (b, lq, h, d), dtype)
    kc = ot.normal(ks[1], (n_layers, b, max_len, hk, d), dtype)
    vc = ot.normal(ks[2], (n_layers, b, max_len, hk, d), dtype)
    lengths = jnp.array([max_len, lq + 3][:b], jnp.int32)
    kw = dict(return_lse=True, implementation=self.IMPLEMENTATION, interpret=self.INTERPRET,
              config=self.CONFIG)
    traced = jax.jit(lambda q, k, v, n, layer: A.decode_attention(q, k, v, n, layer=layer, **kw))
    for layer in range(n_layers):
      want = A.decode_attention(q, kc[layer], vc[layer], lengths, **kw)
      for got in (traced(q, kc, vc, lengths, jnp.int32(layer)),
                  A.decode_attention(q, kc, vc, lengths, layer=layer, **kw)):
        for name, x, y in zip(("o", "lse"), got, want):
          ot.assert_close(x, y, dtype, tol=self.tol(dtype), name=f"{name} layer {layer}")


class TestXla(AttentionTestBase):
  """The "xla" implementation is the reference itself (checked against numpy below); run a
  few cases through the public dispatch path only."""
  IMPLEMENTATION = "xla"
  CASE_NAMES = ("fully_masked",)
  DTYPES = (F32,)


@pytest.mark.gpu
class TestCudnnGpu(AttentionTestBase):
  IMPLEMENTATION = "cudnn"
  RETURNS_LSE = False
  DTYPES = (BF16,)
  # On the H100 run cuDNN refused the odd lengths of "causal" (33) and "gqa4_mqa" (17) at
  # trace time (dispatch then falls through); these are the cases it accepts.
  CASE_NAMES = ("noncausal", "gqa2", "window", "d96")

  test_decode = None  # cudnn has no decode implementation
  test_decode_stacked = None

  def test_refuses_unsupported(self):
    q, k, v, kw = make_inputs("kv_valid", BF16)
    with pytest.raises(NotImplementedError, match="cudnn: .*kv_valid"):
      A.attention(q, k, v, implementation="cudnn", **kw)


class TestPallasTritonInterpret(AttentionTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True
  CONFIG = AttentionBlockConfig.small()


class TestPallasTritonInterpretGroupSplit(AttentionTestBase):
  """dk/dv with the GQA group split over programs (f32 partials summed): every group slice
  count from 1 head per program (gqa4_mqa: 4 slices; gqa16_segments: 16); the dk/dv kernel
  on its own tile (taller kv than the dq kernel's)."""
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True
  CONFIG = AttentionBlockConfig.small().replace(bwd_min_programs=1 << 20, dkv_block_kv=32)
  CASE_NAMES = ("gqa2", "gqa4_mqa", "gqa16_segments")
  test_decode = None
  test_decode_stacked = None


def test_group_split_picks_the_smallest_divisor_that_fills_the_grid():
  from ops.attention.pallas_triton import group_split
  assert group_split(256, 64, 528) == 16      # NSA compressed branch at 16k: 64 programs
  assert group_split(256, 256, 528) == 4
  assert group_split(8, 1000, 528) == 1       # big grid: no split
  assert group_split(6, 10, 528) == 6         # never more slices than heads
  assert group_split(6, 100, 250) == 3        # divisors only
  assert group_split(16, 1, 0) == 1           # 0 disables


class TestPallasTpuInterpret(AttentionTestBase):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = True
  CONFIG = AttentionBlockConfig.for_device("TPU v5p")
  # The TPU kernel's smallest tile is 128, so multi-block paths need long sequences; the
  # Triton interpret run covers the rest of the small cases.
  CASE_NAMES = ("causal", "gqa4_mqa", "window_sinks", "segments", "fully_masked", "d192_dv128",
                "kv_valid", "soft_cap", "chunked_prefill", "q_longer", "multi_block")

  test_decode = None  # decode_attention has no pallas_tpu kernel (TPU decode uses xla)
  test_decode_stacked = None


@pytest.mark.gpu
class TestPallasTritonGpu(AttentionTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  F32_TOL = ot.GPU_F32


@pytest.mark.gpu
class TestPallasTritonGpuGroupSplit(AttentionTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  CONFIG = AttentionBlockConfig.for_device("NVIDIA H100").replace(bwd_min_programs=1 << 20)
  CASE_NAMES = ("gqa2", "gqa4_mqa", "gqa16_segments", "multi_block")
  F32_TOL = ot.GPU_F32
  test_decode = None
  test_decode_stacked = None


@pytest.mark.gpu
class TestPallasTritonGpuSmallBlocks(AttentionTestBase):
  """Compiled with small tiles so the ragged / multi-block paths run on the GPU too."""
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  CONFIG = AttentionBlockConfig(block_q=32, block_kv=16, bwd_block_q=16, bwd_block_kv=32,
                                dkv_block_q=32, dkv_block_kv=16, dkv_num_warps=2,
                                decode_block_kv=16, decode_splits=3)
  F32_TOL = ot.GPU_F32


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=(pytest.mark.slow,) if c in ("multi_block", "len100") else ())
    for c in CASES])
def test_reference_matches_naive(case):
  q, k, v, kw = make_inputs(case, F32)
  o, lse = jax.jit(lambda q, k, v: reference.attention(q, k, v, **kw))(q, k, v)
  b, lq, _, d = q.shape
  lk = k.shape[1]
  on, lsen = _naive(q, k, v, causal=kw.get("causal", False), window=kw.get("window"),
                    sinks=kw.get("sinks", 0), qseg=kw.get("q_segment_ids"),
                    kvseg=kw.get("kv_segment_ids"), valid=kw.get("kv_valid"),
                    scale=d ** -0.5, soft_cap=kw.get("soft_cap"),
                    q_offset=kw.get("q_offset", lk - lq))
  np.testing.assert_allclose(np.asarray(o), on, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), lsen, atol=2e-5, rtol=2e-5)


def test_fully_masked_grads_finite():
  q, k, v, kw = make_inputs("fully_masked", F32)
  g = jax.grad(lambda q, k, v: jnp.sum(A.attention(q, k, v, implementation="xla", **kw) ** 2),
               argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


def test_unknown_implementation_is_value_error():
  q, k, v, _ = make_inputs("causal", F32)
  with pytest.raises(ValueError, match="nope"):
    A.attention(q, k, v, implementation="nope")
  with pytest.raises(ValueError, match="nope"):
    A.decode_attention(q[:, :1], k, v, jnp.array([5, 6]), implementation="nope")


def test_decode_stacked_bad_layer():
  q, k, v, _ = make_inputs("causal", F32)
  stack = lambda x: jnp.stack([x, x])
  n = jnp.array([5, 6])
  with pytest.raises(ValueError, match="layer 2 outside the stacked cache's 2 layers"):
    A.decode_attention(q[:, :1], stack(k), stack(v), n, layer=2)
  with pytest.raises(ValueError, match="integer scalar"):
    A.decode_attention(q[:, :1], stack(k), stack(v), n, layer=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"\[layers, batch, max_len"):
    A.decode_attention(q[:, :1], k, v, n, layer=0)


def test_fallthrough_lists_all_reasons():
  q, k, v, _ = make_inputs("causal", F32)
  valid = jnp.ones(k.shape[:2], bool)
  names = [n for n in ("cudnn", "splash", "pallas_tpu", "pallas_triton")
           if n in A.implementations()]
  # On CPU with interpret=False every compiled kernel refuses; the cuDNN/splash wrappers
  # refuse kv_valid / the platform. Falling through to "xla" must work.
  o = A.attention(q, k, v, kv_valid=valid, implementation=names + ["xla"], interpret=False)
  ot.assert_close(o, reference.attention(q, k, v, kv_valid=valid)[0], F32)
  if _backend.platform() == "cpu" and names:
    with pytest.raises(NotImplementedError) as e:
      A.attention(q, k, v, kv_valid=valid, implementation=names, interpret=False)
    for n in names:
      assert f"{n}:" in str(e.value)


def test_default_is_xla_on_cpu():
  if _backend.platform() != "cpu":
    pytest.skip("CPU default order")
  assert A.api._ATTENTION.candidates(None) == ("xla",)


def test_config_for_device():
  c = AttentionBlockConfig.for_device("NVIDIA H100 80GB HBM3")
  assert c.block_q >= 64 and c.num_warps >= 4
  assert AttentionBlockConfig.for_device("TPU v5p").block_kv % 128 == 0
  assert AttentionBlockConfig.for_device("cpu").replace(block_q=32).block_q == 32
  base = AttentionBlockConfig(bwd_block_q=32, bwd_block_kv=64, bwd_num_warps=4, bwd_num_stages=2)
  assert base.dkv_tiles == (32, 64, 4, 2)      # unset dk/dv fields follow the bwd_* ones
  assert base.replace(dkv_block_kv=128, dkv_num_stages=3).dkv_tiles == (32, 128, 4, 3)
  with pytest.raises(ValueError, match="dkv_block_kv must be a power of two, got 96"):
    base.replace(dkv_block_kv=96)
  with pytest.raises(ValueError, match="bwd_num_warps must be positive"):
    base.replace(bwd_num_warps=0)


SPLASH_CASES = {
    "causal_gqa": (1, 256, 256, 4, 2, 128, dict(causal=True)),
    "window_segments_cap": (1, 256, 256, 2, 1, 128,
                            dict(causal=True, window=100, soft_cap=5.0, segments=True)),
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_splash_interpret(case):
  if "splash" not in A.implementations():
    pytest.skip("splash attention not importable in this jax")
  b, lq, lk, h, hk, d, opts = SPLASH_CASES[case]
  ks = jax.random.split(jax.random.key(5), 4)
  q = ot.normal(ks[0], (b, lq, h, d), F32)
  k = ot.normal(ks[1], (b, lk, hk, d), F32)
  v = ot.normal(ks[2], (b, lk, hk, d), F32)
  kw = {n: opts[n] for n in ("causal", "window", "soft_cap") if n in opts}
  if opts.get("segments"):
    seg = jnp.where(jnp.arange(lq) < 90, 0, 1)[None].repeat(b, 0)
    kw.update(q_segment_ids=seg, kv_segment_ids=seg)
  do = ot.normal(ks[3], (b, lq, h, d), F32)
  fn = lambda impl: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(A.attention(q, k, v, implementation=impl, interpret=True,
                                          **kw) * do), argnums=(0, 1, 2)))
  (l1, g1), (l2, g2) = fn("splash")(q, k, v), fn("xla")(q, k, v)
  np.testing.assert_allclose(l1, l2, rtol=1e-4)
  for a, r in zip(g1, g2):
    ot.assert_close(a, r, F32, grad=True)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=96, sinks=4),
                                dict(soft_cap=30.0, segments=True)],
                         ids=["causal", "window_sinks", "softcap_segments"])
def test_triton_kernels_lower_for_h200(kw):
  """The Pallas Triton forward, dq and dk/dv kernels (H200 default blocks, GQA 8 / 2, D128,
  lengths not multiples of the blocks) translate to Triton IR on this CPU host: the GPU
  compiler's path, which interpret mode replaces."""
  kw = dict(kw)
  b, t, h, kvh, d = 2, 1000, 8, 2, 128
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  seg = sds(b, t, dt=jnp.int32) if kw.pop("segments", False) else None
  cfg = AttentionBlockConfig.for_device("NVIDIA H200")

  def loss(q, k, v, seg):
    o, lse = A.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, return_lse=True,
                         implementation="pallas_triton", config=cfg, **kw)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(lse)

  text = ot.lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), sds(b, t, h, d), sds(b, t, kvh, d),
                          sds(b, t, kvh, d), seg).as_text()
  for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
    assert kernel in text, kernel


@pytest.mark.parametrize("stacked", [False, True])
def test_triton_decode_lowers_for_h200(stacked):
  """The split-kv decode kernel: 2 new tokens against 8192 cached, per-layer or stacked caches
  read at a traced layer."""
  b, h, kvh, d, n = 4, 16, 2, 128, 8192
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  lead = (3,) if stacked else ()
  args = [sds(b, 2, h, d), sds(*lead, b, n, kvh, d), sds(*lead, b, n, kvh, d),
          sds(b, dt=jnp.int32)]
  fn = functools.partial(A.decode_attention, window=512, implementation="pallas_triton",
                         config=AttentionBlockConfig.for_device("NVIDIA H200"))
  if stacked:
    call = lambda q, k, v, lengths, layer: fn(q, k, v, lengths, layer=layer)
    args.append(sds(dt=jnp.int32))
  else:
    call = fn
  text = ot.lower_for_gpu(call, *args).as_text()
  assert "flash_decoding" in text
