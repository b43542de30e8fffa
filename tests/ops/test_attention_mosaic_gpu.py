"""ops.attention's Mosaic GPU kernels: the forward (ops/attention/pallas_mosaic_gpu.py) with
the Mosaic GPU backward (ops/attention/pallas_mosaic_gpu_bwd.py, AttentionBlockConfig.
mgpu_backward: the Hopper default) or the Triton one.

CPU: interpret mode on shapes with several key steps per CTA (the rings refill, a causal
CTA's warpgroups skip different steps), lowering for an H200 (the compiled path: transposed
views, register operands, run_state accumulators), and the refusals. GPU: the shared case
matrix and longer sequences, with each backward.
"""
import jax
import jax.numpy as jnp
import pytest

import ops.attention as A
from ops.attention import reference
from ops.attention.config import AttentionBlockConfig
from tests.ops import op_testing as ot
from tests.ops.test_attention import AttentionTestBase

BF16, F32 = jnp.bfloat16, jnp.float32
IMPL = "pallas_mosaic_gpu"
SMALL = AttentionBlockConfig.small().replace(mgpu_block_kv=64)
SMALL_MGPU_BWD = SMALL.replace(mgpu_backward=True)
GPU_MGPU_BWD = AttentionBlockConfig.for_device("NVIDIA H200")
GPU_TRITON_BWD = GPU_MGPU_BWD.replace(mgpu_backward=False)


def _inputs(b, lq, lk, h, hk, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (ot.normal(ks[i], s, BF16) for i, s in
             enumerate([(b, lq, h, d), (b, lk, hk, d), (b, lk, hk, d)]))
  return q, k, v, ot.normal(ks[3], (b, lq, h, d), F32), ot.normal(ks[4], (b, h, lq), F32)


def _check_against_reference(shape, kw, *, interpret, config, jit=True):
  """o, lse and the gradients of q, k, v (through o and lse) against the f32 reference.
  jit=False runs our side eagerly: interpreted Mosaic GPU kernels nest XLA computations in
  their simulated threads, and the three kernels of the Mosaic GPU backward inside one jitted
  program deadlocked on 2 CPU cores (70 x 150 full attention)."""
  q, k, v, do, dlse = _inputs(*shape)

  def loss(fn, jit=True):
    def f(q, k, v):
      o, lse = fn(q, k, v)
      return jnp.sum(o.astype(F32) * do) + jnp.sum(lse * dlse), (o, lse)
    grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(grad) if jit else grad

  ours = lambda q, k, v: A.attention(q, k, v, implementation=IMPL, interpret=interpret,
                                     config=config, return_lse=True, **kw)
  ref = lambda q, k, v: reference.attention(q.astype(F32), k.astype(F32), v.astype(F32), **kw)
  (_, (o, lse)), grads = loss(ours, jit)(q, k, v)
  (_, (o_ref, lse_ref)), grads_ref = loss(ref)(q, k, v)
  assert o.dtype == BF16 and o.shape == q.shape and lse.shape == lse_ref.shape
  tol = ot.TOL[jnp.dtype(BF16).type]
  ot.assert_close(o, o_ref, BF16, tol=tol, name="o")
  ot.assert_close(lse, lse_ref, BF16, tol=tol, name="lse")
  for name, g, gr in zip("qkv", grads, grads_ref):
    ot.assert_close(g, gr, BF16, tol=tol * ot.GRAD_FACTOR, name=f"d{name}")


# (batch, q_len, kv_len, heads, kv_heads, head_dim), options. With 64-key steps: 3 key steps
# for one CTA of 128 queries, so the ring of 2 slots refills and the first warpgroup skips one.
INTERPRET_CASES = {
    "chunked_gqa": ((1, 128, 192, 4, 2, 64), dict(causal=True)),
    # one key step: a ring of one slot (two failed to trace on the GPU: the second load's
    # static slice lay past the padded keys)
    "single_slot": ((1, 40, 40, 2, 1, 64), dict(causal=True)),
    "ragged_full": ((1, 70, 150, 2, 1, 64), dict()),
    "multi_cta_mqa": ((2, 300, 300, 4, 1, 64), dict(causal=True)),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=() if c in ("chunked_gqa", "single_slot") else (pytest.mark.slow,))
    for c in INTERPRET_CASES])
def test_interpret_matches_reference(case):
  shape, kw = INTERPRET_CASES[case]
  _check_against_reference(shape, kw, interpret=True, config=SMALL)


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=() if c == "chunked_gqa" else (pytest.mark.slow,))
    for c in INTERPRET_CASES])
def test_interpret_mosaic_gpu_backward_matches_reference(case):
  shape, kw = INTERPRET_CASES[case]
  _check_against_reference(shape, kw, interpret=True, config=SMALL_MGPU_BWD, jit=False)


@pytest.mark.parametrize("mgpu_backward,causal,d", [(False, True, 128), (True, True, 128),
                                                    (True, False, 64)])
def test_lowers_for_h200(mgpu_backward, causal, d):
  """The compiled path (which interpret mode replaces: transposed views, register operands,
  run_state) passes Mosaic GPU's layout inference and lowering, forward and backward, on this
  CPU host."""
  cfg = AttentionBlockConfig.for_device("NVIDIA H200").replace(mgpu_backward=mgpu_backward)
  q = jax.ShapeDtypeStruct((1, 1024, 4, d), BF16)
  kv = jax.ShapeDtypeStruct((1, 1024, 2, d), BF16)
  f = lambda q, k, v: A.attention(q, k, v, causal=causal, implementation=IMPL, config=cfg)
  grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(F32)), argnums=(0, 1, 2))
  text = ot.lower_for_gpu(grad, q, kv, kv).as_text()
  assert "mosaic_gpu" in text
  # the Triton backward's kernels appear exactly when the Mosaic GPU one is off
  assert ("flash_attention_dq" in text) != mgpu_backward


@pytest.mark.parametrize("kw,d,dtype,match", [
    (dict(causal=True, window=8), 64, BF16, "window"),
    (dict(causal=True, soft_cap=2.0), 64, BF16, "soft_cap"),
    (dict(causal=True), 64, F32, "dtypes"),
    (dict(causal=True), 96, BF16, "head_dim 96"),
    (dict(causal=True, q_offset=-4), 64, BF16, "q_offset"),
])
def test_refuses_what_it_does_not_cover(kw, d, dtype, match):
  q = jnp.zeros((1, 16, 2, d), dtype)
  with pytest.raises(NotImplementedError, match=f"{IMPL}: .*{match}"):
    A.attention(q, q, q, implementation=IMPL, interpret=True, **kw)


@pytest.mark.parametrize("cfg,match", [
    (AttentionBlockConfig(mgpu_block_kv=128, mgpu_stages=3), "forward"),
    (AttentionBlockConfig(mgpu_backward=True, mgpu_bwd_stages=12), "backward"),
])
def test_refuses_tiles_past_shared_memory(cfg, match):
  """Before any compile: 128 keys x 3 slots at head_dim 128 failed to compile on the H200."""
  q = jnp.zeros((1, 256, 2, 128), BF16)
  with pytest.raises(NotImplementedError, match=f"{IMPL}: Mosaic GPU attention {match}"):
    A.attention(q, q, q, causal=True, implementation=IMPL, interpret=True, config=cfg)


@pytest.mark.gpu
class TestPallasMosaicGpuGpu(AttentionTestBase):
  IMPLEMENTATION = IMPL
  INTERPRET = False
  DTYPES = (BF16,)
  CASE_NAMES = ("causal", "noncausal", "gqa2", "gqa4_mqa", "chunked_prefill", "q_longer",
                "len1")
  test_decode = None


@pytest.mark.gpu
class TestPallasMosaicGpuTritonBackwardGpu(TestPallasMosaicGpuGpu):
  CONFIG = GPU_TRITON_BWD


def test_hopper_default_is_the_mosaic_gpu_backward():
  assert GPU_MGPU_BWD.mgpu_backward
  assert AttentionBlockConfig.for_device("NVIDIA H100 80GB HBM3").mgpu_backward
  assert not AttentionBlockConfig.for_device("NVIDIA A100-SXM4-80GB").mgpu_backward


@pytest.mark.gpu
@pytest.mark.parametrize("config", [GPU_MGPU_BWD, GPU_TRITON_BWD], ids=["mgpu_bwd", "triton_bwd"])
@pytest.mark.parametrize("shape,kw", [
    ((1, 1024, 1024, 8, 2, 128), dict(causal=True)),
    ((2, 1000, 1500, 4, 4, 128), dict(causal=True)),
    ((1, 640, 2048, 4, 1, 64), dict()),
    ((1, 4096, 4096, 4, 4, 128), dict(causal=True)),
], ids=["gqa_1k", "ragged_chunk", "full_mqa_d64", "causal_4k"])
def test_gpu_long_sequences(shape, kw, config):
  _check_against_reference(shape, kw, interpret=False, config=config)
