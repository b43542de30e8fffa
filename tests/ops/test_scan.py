"""ops.scan.linear_scan: every implementation against the sequential lax.scan reference (f32)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.scan import ScanConfig, implementations, linear_scan, reference
from tests.ops import op_testing

# Small blocks so that CPU-interpreted shapes still span several channel blocks and chunks.
SMALL = ScanConfig(block_c=32, time_chunk=4, num_warps=1, bwd_block_c=32, bwd_time_chunk=3,
                   bwd_num_warps=1, tpu_block_c=128, tpu_block_t=8)
# Compiled GPU cases: a short prefetch ring compiles fast; test_large runs the device default.
GPU_SMALL = ScanConfig(block_c=32, time_chunk=8, num_warps=1, bwd_block_c=32, bwd_time_chunk=6,
                       bwd_num_warps=1)


def _inputs(B, T, C, dtype, a_const=False, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  a_shape = (C,) if a_const else (B, T, C)
  a = jax.random.uniform(k[0], a_shape, jnp.float32, 0.6, 1.0).astype(dtype)
  b = op_testing.normal(k[1], (B, T, C), dtype)
  h0 = op_testing.normal(k[2], (B, C), jnp.float32)
  g = op_testing.normal(k[3], (B, T, C), dtype)
  g_last = op_testing.normal(k[4], (B, C), jnp.float32)
  return a, b, h0, g, g_last


def _ref(a, b, h0, reverse):
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  return reference.linear_scan_sequential(f32(a), f32(b), f32(h0), reverse=reverse)


def _grads(fn, a, b, h0, g, g_last):
  def loss(a, b, h0):
    h, h_last = fn(a, b, h0)
    return (jnp.sum(h.astype(jnp.float32) * g.astype(jnp.float32)) + jnp.sum(h_last * g_last))
  return jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)


class ScanTestBase:
  IMPL = "xla"
  INTERPRET = None
  CONFIG = None
  F32_TOL = None  # None: op_testing.TOL

  def scan(self, a, b, h0=None, reverse=False):
    return linear_scan(a, b, h0, reverse=reverse, implementation=self.IMPL,
                       interpret=self.INTERPRET, config=self.CONFIG)

  def tol(self, dtype, grad=False):
    base = op_testing.TOL[jnp.dtype(dtype).type]
    if dtype == jnp.float32 and self.F32_TOL is not None:
      base = self.F32_TOL
    return base * (op_testing.GRAD_FACTOR if grad else 1.0)

  @pytest.mark.parametrize("B,T,C,dtype,reverse", [
      (1, 1, 40, jnp.float32, False),
      (2, 7, 130, jnp.float32, True),
      (2, 100, 72, jnp.float32, False),
      (1, 100, 130, jnp.bfloat16, True),
      # whole tiles of time and channels for every test config (no partial tile anywhere)
      (2, 24, 64, jnp.float32, True),
      (1, 48, 96, jnp.bfloat16, False),
  ])
  def test_forward(self, B, T, C, dtype, reverse):
    a, b, h0, _, _ = _inputs(B, T, C, dtype)
    h, h_last = jax.jit(functools.partial(self.scan, reverse=reverse))(a, b, h0)
    h_ref, h_last_ref = _ref(a, b, h0, reverse)
    assert h.dtype == b.dtype and h.shape == b.shape
    assert h_last.dtype == jnp.float32 and h_last.shape == (B, C)
    op_testing.assert_close(h, h_ref, dtype, tol=self.tol(dtype), name="h")
    op_testing.assert_close(h_last, h_last_ref, dtype, tol=self.tol(dtype), name="h_last")

  def test_h0_none_is_zeros(self):
    a, b, _, _, _ = _inputs(1, 7, 40, jnp.float32)
    h, h_last = self.scan(a, b)
    h_ref, h_last_ref = _ref(a, b, jnp.zeros((1, 40)), False)
    op_testing.assert_close(h, h_ref, jnp.float32, tol=self.tol(jnp.float32))
    op_testing.assert_close(h_last, h_last_ref, jnp.float32, tol=self.tol(jnp.float32))

  @pytest.mark.parametrize("B,T,C,dtype,reverse,a_const", [
      (2, 7, 130, jnp.float32, False, False),
      (1, 9, 40, jnp.float32, True, False),
      (2, 1, 40, jnp.float32, False, False),
      (1, 33, 72, jnp.bfloat16, False, False),
      (2, 10, 40, jnp.float32, False, True),
      (1, 10, 130, jnp.float32, True, True),
      (1, 24, 64, jnp.float32, False, False),      # whole tiles, as in test_forward
      (2, 48, 96, jnp.bfloat16, True, False),
      (1, 24, 64, jnp.float32, True, True),
  ])
  def test_grads(self, B, T, C, dtype, reverse, a_const):
    a, b, h0, g, g_last = _inputs(B, T, C, dtype, a_const=a_const)
    got = jax.jit(lambda *x: _grads(functools.partial(self.scan, reverse=reverse), *x))(
        a, b, h0, g, g_last)
    want = _grads(lambda a, b, h0: _ref(a, b, h0, reverse), a, b, h0, g, g_last)
    for name, x, y, primal in zip(("da", "db", "dh0"), got, want, (a, b, h0)):
      assert x.dtype == primal.dtype and x.shape == primal.shape, name
      op_testing.assert_close(x, y, dtype, tol=self.tol(dtype, grad=True), name=name)

  @pytest.mark.parametrize("reverse", [False, True])
  def test_constant_decay_forward(self, reverse):
    a, b, h0, _, _ = _inputs(2, 13, 130, jnp.float32, a_const=True)
    h, h_last = self.scan(a, b, h0, reverse=reverse)
    h_full, h_last_full = self.scan(jnp.broadcast_to(a, b.shape), b, h0, reverse=reverse)
    h_ref, _ = _ref(a, b, h0, reverse)
    op_testing.assert_close(h, h_ref, jnp.float32, tol=self.tol(jnp.float32))
    np.testing.assert_allclose(h, h_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_last, h_last_full, rtol=1e-6, atol=1e-6)

  @pytest.mark.parametrize("reverse", [False, True])
  def test_chunked_equals_unchunked(self, reverse):
    B, T, C, cut = 2, 23, 40, 9
    a, b, h0, _, _ = _inputs(B, T, C, jnp.float32)
    h, h_last = self.scan(a, b, h0, reverse=reverse)
    # reverse runs from the end: the second call (chained through h_last) covers the front.
    first, second = (slice(cut, T), slice(0, cut)) if reverse else (slice(0, cut), slice(cut, T))
    h1, hl1 = self.scan(a[:, first], b[:, first], h0, reverse=reverse)
    h2, hl2 = self.scan(a[:, second], b[:, second], hl1, reverse=reverse)
    np.testing.assert_allclose(h[:, first], h1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h[:, second], h2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h_last, hl2, rtol=1e-6, atol=1e-6)

  def test_vmap(self):
    a, b, h0, _, _ = _inputs(2, 7, 40, jnp.float32)
    stack = lambda x: jnp.stack([x, 0.5 * x])
    h, h_last = jax.vmap(self.scan)(stack(a), stack(b), stack(h0))
    for i in range(2):
      h_ref, hl_ref = _ref(stack(a)[i], stack(b)[i], stack(h0)[i], False)
      op_testing.assert_close(h[i], h_ref, jnp.float32, tol=self.tol(jnp.float32))
      op_testing.assert_close(h_last[i], hl_ref, jnp.float32, tol=self.tol(jnp.float32))


class TestScanXla(ScanTestBase):
  IMPL = "xla"


class TestScanTritonInterpret(ScanTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = SMALL


class TestScanTpuInterpret(ScanTestBase):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CONFIG = SMALL


@pytest.mark.gpu
class TestScanTritonGpu(ScanTestBase):
  IMPL = "pallas_triton"
  INTERPRET = False
  CONFIG = GPU_SMALL

  @pytest.mark.parametrize("a_const", [False, True])
  def test_large(self, a_const):
    self.CONFIG = None                        # the device's default block sizes
    a, b, h0, g, g_last = _inputs(2, 1000, 1000, jnp.float32, a_const=a_const)
    h, h_last = self.scan(a, b, h0)
    h_ref, hl_ref = _ref(a, b, h0, False)
    op_testing.assert_close(h, h_ref, jnp.float32, tol=self.tol(jnp.float32))
    got = jax.jit(lambda *x: _grads(self.scan, *x))(a, b, h0, g, g_last)
    want = _grads(lambda a, b, h0: _ref(a, b, h0, False), a, b, h0, g, g_last)
    for x, y in zip(got, want):
      op_testing.assert_close(x, y, jnp.float32, tol=self.tol(jnp.float32, grad=True))



# The serial backward with several chunks of rows in flight (bwd_prefetch_chunks > 1): 3-row
# chunks, so T=1, 7, 9 end inside the ring and T=33 / 48 run past it many times.
class TestScanTritonBwdPrefetchInterpret(ScanTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, bwd_prefetch_chunks=3)
  # the forward is unchanged: TestScanTritonInterpret's cases cover it
  test_forward = test_h0_none_is_zeros = test_constant_decay_forward = None
  test_chunked_equals_unchunked = test_vmap = None


@pytest.mark.gpu
class TestScanTritonBwdPrefetchGpu(TestScanTritonBwdPrefetchInterpret):
  INTERPRET = False
  CONFIG = dataclasses.replace(GPU_SMALL, bwd_prefetch_chunks=2)


def _gpu_fwd_bwd_ir(cfg, a_const, channels):
  """Triton IR text of the scan's forward and backward at T=200, built on this host."""
  a = jax.ShapeDtypeStruct((channels,) if a_const else (1, 200, channels), jnp.float32)
  b = jax.ShapeDtypeStruct((1, 200, channels), jnp.float32)

  def fwd_bwd(a, b):
    h, vjp = jax.vjp(lambda a, b: linear_scan(a, b, implementation="pallas_triton",
                                              config=cfg)[0], a, b)
    return vjp(h)
  return op_testing.lower_for_gpu(fwd_bwd, a, b).as_text()


@pytest.mark.parametrize("a_const", [False, True])
def test_prefetch_backward_lowers_for_the_gpu(a_const):
  """Triton IR of the serial backward with two chunks in flight at the device's block sizes."""
  cfg = dataclasses.replace(ScanConfig.for_device("NVIDIA H200"), bwd_prefetch_chunks=2)
  assert "linear_scan_bwd" in _gpu_fwd_bwd_ir(cfg, a_const, 96)


def test_bwd_prefetch_chunks_is_checked():
  with pytest.raises(ValueError, match="bwd_prefetch_chunks"):
    ScanConfig(bwd_prefetch_chunks=0)


# Time segments chained by their carries (segment > 0): 4-step segments leave a partial last
# segment at T=7, 9, 10, 13, 23, 33 and 100; B=2 interleaves two chains per channel block.
class TestScanTritonSegmentsInterpret(ScanTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, segment=4, bwd_segment=4)


@pytest.mark.parametrize("a_const,reverse", [(False, True), (True, False)])
def test_lookback_interpret(a_const, reverse):
  """In interpret mode earlier segments have all finished, so look-back ends at its first read
  (tests/ops/test_triton_chain.py folds unfinished ones); these cases check the plumbing."""
  cfg = dataclasses.replace(SMALL, segment=4, bwd_segment=4, lookback=True)
  scan = functools.partial(linear_scan, reverse=reverse, implementation="pallas_triton",
                           interpret=True, config=cfg)
  a, b, h0, g, g_last = _inputs(2, 11, 40, jnp.float32, a_const=a_const)
  ref = lambda a, b, h0: _ref(a, b, h0, reverse)
  op_testing.assert_close(scan(a, b, h0)[0], ref(a, b, h0)[0], jnp.float32)
  got = jax.jit(lambda *x: _grads(scan, *x))(a, b, h0, g, g_last)
  for x, y in zip(got, _grads(ref, a, b, h0, g, g_last)):
    op_testing.assert_close(x, y, jnp.float32, grad=True)


@pytest.mark.gpu
class TestScanTritonSegmentsGpu(ScanTestBase):
  """Runs the atomic hand-off between programs (interpret mode uses plain loads/stores)."""
  IMPL = "pallas_triton"
  INTERPRET = False
  CONFIG = dataclasses.replace(GPU_SMALL, segment=8, bwd_segment=8)

  @pytest.mark.parametrize("a_const,reverse", [(False, False), (True, True)])
  def test_many_segments(self, a_const, reverse):
    # 2 x 63 segments x 32 channel blocks: thousands of programs wait on each other
    self.CONFIG = dataclasses.replace(self.CONFIG, segment=16, bwd_segment=16)
    a, b, h0, g, g_last = _inputs(2, 1000, 1000, jnp.float32, a_const=a_const)
    h, _ = self.scan(a, b, h0, reverse=reverse)
    op_testing.assert_close(h, _ref(a, b, h0, reverse)[0], jnp.float32,
                            tol=self.tol(jnp.float32))
    scan = functools.partial(self.scan, reverse=reverse)
    got = jax.jit(lambda *x: _grads(scan, *x))(a, b, h0, g, g_last)
    want = _grads(lambda a, b, h0: _ref(a, b, h0, reverse), a, b, h0, g, g_last)
    for x, y in zip(got, want):
      op_testing.assert_close(x, y, jnp.float32, tol=self.tol(jnp.float32, grad=True))


def test_lookback_refused_when_compiled():
  """Look-back segments are refused outside interpret mode (the LIF one crashed the Triton
  compiler on the H200), so dispatch moves on instead of crashing the process."""
  cfg = dataclasses.replace(ScanConfig.for_device("NVIDIA H200"), segment=32, lookback=True)
  b = jax.ShapeDtypeStruct((1, 200, 300), jnp.float32)
  with pytest.raises(NotImplementedError, match="lookback"):
    op_testing.lower_for_gpu(
        lambda a, b: linear_scan(a, b, implementation="pallas_triton", config=cfg)[0], b, b)


@pytest.mark.parametrize("a_const", [False, True])
def test_segments_lower_for_the_gpu(a_const):
  """The Triton IR of both segment kernels (atomic tickets, the spin loop), built here."""
  cfg = dataclasses.replace(ScanConfig.for_device("NVIDIA H200"), segment=32,
                            bwd_segment=32)
  text = _gpu_fwd_bwd_ir(cfg, a_const, 300)
  assert "linear_scan_fwd_segments" in text and "linear_scan_bwd_segments" in text

def test_segment_config_is_checked():
  for bad in (dict(segment=-1), dict(bwd_segment=512)):
    with pytest.raises(ValueError, match=r"must be in \[0, 256\]"):
      ScanConfig(**bad)


def test_xla_reference_matches_sequential():
  a, b, h0, _, _ = _inputs(2, 37, 24, jnp.float32)
  for reverse in (False, True):
    h, hl = reference.linear_scan(a, b, h0, reverse=reverse)
    hs, hls = reference.linear_scan_sequential(a, b, h0, reverse=reverse)
    np.testing.assert_allclose(h, hs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hl, hls, rtol=1e-5, atol=1e-5)


def test_dispatch_errors():
  a, b, h0, _, _ = _inputs(1, 3, 8, jnp.float32)
  with pytest.raises(ValueError, match="unknown implementation"):
    linear_scan(a, b, implementation="nope")
  with pytest.raises(ValueError):
    linear_scan(a[:, :, :4], b)
  if jax.default_backend() == "cpu":
    # Compiled Triton cannot run on CPU: reported, and the sequence falls through to xla.
    with pytest.raises(Exception, match="no implementation can handle(.|\n)*pallas_triton: compiles for gpu"):
      linear_scan(a, b, implementation="pallas_triton", interpret=False)
    h, _ = linear_scan(a, b, implementation=("pallas_triton", "xla"), interpret=False)
    np.testing.assert_allclose(h, _ref(a, b, None, False)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Mosaic GPU kernels
# Shapes they take: T a multiple of mgpu_time_chunk (8 here: 2-3 tiles), C of mgpu_block_c.
MGPU_SMALL = dataclasses.replace(SMALL, mgpu_block_c=128, mgpu_time_chunk=8, mgpu_stages=2)


class ScanMosaicGpuBase:
  INTERPRET = None
  CONFIG = MGPU_SMALL

  def scan(self, a, b, h0=None, reverse=False, implementation="pallas_mosaic_gpu"):
    return linear_scan(a, b, h0, reverse=reverse, implementation=implementation,
                       interpret=self.INTERPRET, config=self.CONFIG)

  @pytest.mark.parametrize("B,T,C,dtype,reverse,a_const", [
      (2, 24, 128, jnp.float32, False, False),
      (1, 16, 256, jnp.float32, True, False),
      (2, 16, 128, jnp.float32, True, True),
      (1, 24, 128, jnp.bfloat16, False, True),
  ])
  def test_forward_and_grads(self, B, T, C, dtype, reverse, a_const):
    a, b, h0, g, g_last = _inputs(B, T, C, dtype, a_const=a_const)
    h, h_last = jax.jit(functools.partial(self.scan, reverse=reverse))(a, b, h0)
    h_ref, h_last_ref = _ref(a, b, h0, reverse)
    tol = op_testing.TOL[jnp.dtype(dtype).type]
    op_testing.assert_close(h, h_ref, dtype, tol=tol, name="h")
    op_testing.assert_close(h_last, h_last_ref, dtype, tol=tol, name="h_last")
    got = jax.jit(lambda *x: _grads(functools.partial(self.scan, reverse=reverse), *x))(
        a, b, h0, g, g_last)
    want = _grads(lambda a, b, h0: _ref(a, b, h0, reverse), a, b, h0, g, g_last)
    for name, x, y, primal in zip(("da", "db", "dh0"), got, want, (a, b, h0)):
      assert x.dtype == primal.dtype and x.shape == primal.shape, name
      op_testing.assert_close(x, y, dtype, grad=True, name=name)

  def test_other_shapes_fall_through(self):
    a, b, h0, _, _ = _inputs(1, 12, 128, jnp.float32)
    with pytest.raises(NotImplementedError, match="T % 8 == 0"):
      self.scan(a, b, h0)
    narrow = dataclasses.replace(self.CONFIG, mgpu_block_c=64)
    with pytest.raises(NotImplementedError, match="mgpu_block_c 64: a multiple of 128"):
      linear_scan(a[:, :8], b[:, :8], h0, implementation="pallas_mosaic_gpu",
                  interpret=self.INTERPRET, config=narrow)
    # the backward's 3 input tiles per stage do not fit 2 stages of 64 x 128 f32 tiles
    a64, b64, h64, _, _ = _inputs(1, 64, 128, jnp.float32)
    deep = dataclasses.replace(self.CONFIG, mgpu_time_chunk=64, mgpu_stages=2)
    with pytest.raises(NotImplementedError, match="scan backward .* exceed the 230400 bytes"):
      linear_scan(a64, b64, h64, implementation="pallas_mosaic_gpu", interpret=self.INTERPRET,
                  config=deep)
    h, _ = self.scan(a, b, h0, implementation=("pallas_mosaic_gpu", "xla"))
    op_testing.assert_close(h, _ref(a, b, h0, False)[0], jnp.float32)


@pytest.mark.skipif("pallas_mosaic_gpu" not in implementations(), reason="no jax Mosaic GPU")
class TestScanMosaicGpuInterpret(ScanMosaicGpuBase):
  INTERPRET = True


@pytest.mark.gpu
class TestScanMosaicGpuGpu(ScanMosaicGpuBase):
  INTERPRET = False
  CONFIG = dataclasses.replace(GPU_SMALL, mgpu_block_c=128, mgpu_time_chunk=8, mgpu_stages=2)


@pytest.mark.gpu
@pytest.mark.parametrize("a_const,reverse", [(False, False), (True, True)])
def test_mosaic_gpu_default_tiles_gpu(a_const, reverse):
  """The H100/H200 defaults (32-step tiles, as many stages as fit) at T a multiple of 32."""
  scan = functools.partial(linear_scan, reverse=reverse, implementation="pallas_mosaic_gpu",
                           interpret=False, config=ScanConfig.for_device("NVIDIA H200"))
  a, b, h0, g, g_last = _inputs(2, 96, 256, jnp.float32, a_const=a_const)
  h, h_last = jax.jit(scan)(a, b, h0)
  h_ref, h_last_ref = _ref(a, b, h0, reverse)
  op_testing.assert_close(h, h_ref, jnp.float32, name="h")
  op_testing.assert_close(h_last, h_last_ref, jnp.float32, name="h_last")
  got = jax.jit(lambda *x: _grads(scan, *x))(a, b, h0, g, g_last)
  want = _grads(lambda a, b, h0: _ref(a, b, h0, reverse), a, b, h0, g, g_last)
  for name, x, y in zip(("da", "db", "dh0"), got, want):
    op_testing.assert_close(x, y, jnp.float32, grad=True, name=name)


@pytest.mark.parametrize("a_const", [False, True])
def test_mosaic_gpu_lowers_for_the_gpu(a_const):
  """Default H200 tiles pass Mosaic GPU's layout inference and shared-memory check on this
  host (interpret mode checks neither), forward and backward: the backward's first-tile
  select with a scalar predicate ran in interpret mode but failed to lower on the H200
  (session 13)."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  b = jax.ShapeDtypeStruct((2, 256, 256), jnp.float32)
  a = jax.ShapeDtypeStruct((256,), jnp.float32) if a_const else b
  cfg = ScanConfig.for_device("NVIDIA H200")
  loss = lambda a, b: jnp.sum(
      linear_scan(a, b, implementation="pallas_mosaic_gpu", config=cfg)[0])
  text = op_testing.lower_for_gpu(jax.grad(loss, argnums=(0, 1)), a, b).as_text()
  assert text.count("custom_call @mosaic_gpu") == 2, "one forward and one backward kernel"
