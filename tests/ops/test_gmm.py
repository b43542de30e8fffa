"""Tests of ops.gmm: every implementation against the f32 HIGHEST reference, plus routing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import gmm as gmm_op
from ops.gmm import reference, routing, shapes
from ops.gmm.config import GmmBlockConfig
from tests.ops import op_testing

HIGHEST = jax.lax.Precision.HIGHEST

# (m, k, n, group_sizes): an empty group, a group of size 1, sum < m, all rows in one
# group, m / k / n not multiples of any tile, groups straddling tile boundaries.
CASES = {
    "odd_empty_one_partial": (37, 40, 24, (0, 10, 1, 20, 3)),
    "one_group": (64, 32, 48, (0, 64, 0)),
    "straddle_full": (48, 136, 40, (5, 17, 0, 26)),
    "nothing_routed": (24, 16, 16, (0, 0)),
}
DTYPES = (jnp.float32, jnp.bfloat16)


def _inputs(case, dtype, seed=0):
  m, k, n, sizes = CASES[case]
  g = len(sizes)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = op_testing.normal(k1, (m, k), dtype)
  rhs = op_testing.normal(k2, (g, k, n), dtype, scale=k ** -0.5)
  dout = op_testing.normal(k3, (m, n), dtype)
  return lhs, rhs, dout, jnp.asarray(sizes, jnp.int32)


def _f32(*xs):
  return [x.astype(jnp.float32) for x in xs]


class GmmTestBase:
  IMPLEMENTATION = "xla"
  INTERPRET = None
  CONFIG = None  # GmmBlockConfig or None (device default)
  F32_TOL = None  # None: op_testing.TOL

  def _tol(self, dtype, grad=False):
    if dtype == jnp.float32 and self.F32_TOL is not None:
      return self.F32_TOL * (op_testing.GRAD_FACTOR if grad else 1.0)
    return None

  def _kw(self):
    return dict(implementation=self.IMPLEMENTATION, interpret=self.INTERPRET, config=self.CONFIG)

  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("case", sorted(CASES))
  def test_gmm_forward(self, case, dtype):
    lhs, rhs, _, gs = _inputs(case, dtype)
    out = jax.jit(lambda a, b, c: gmm_op.gmm(a, b, c, **self._kw()))(lhs, rhs, gs)
    assert out.dtype == dtype and out.shape == (lhs.shape[0], rhs.shape[2])
    ref = reference.gmm(*_f32(lhs, rhs), gs, precision=HIGHEST)
    op_testing.assert_close(out, ref, dtype, tol=self._tol(dtype))
    tail = int(np.sum(np.asarray(gs)))
    np.testing.assert_array_equal(np.asarray(out[tail:], np.float32), 0.0)

  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("case", sorted(CASES))
  def test_gmm_grads(self, case, dtype):
    if self.INTERPRET and dtype == jnp.float32 and case != "odd_empty_one_partial":
      pytest.skip("interpret mode is slow: f32 gradients run on the main edge case only")
    lhs, rhs, dout, gs = _inputs(case, dtype)
    loss = lambda a, b: jnp.sum(gmm_op.gmm(a, b, gs, preferred_element_type=jnp.float32,
                                           **self._kw()) * dout.astype(jnp.float32))
    ref_loss = lambda a, b: jnp.sum(reference.gmm(a, b, gs, precision=HIGHEST) *
                                    dout.astype(jnp.float32))
    dl, dr = jax.jit(jax.grad(loss, (0, 1)))(lhs, rhs)
    rl, rr = jax.grad(ref_loss, (0, 1))(*_f32(lhs, rhs))
    assert dl.dtype == dtype and dr.dtype == dtype
    op_testing.assert_close(dl, rl, dtype, grad=True, tol=self._tol(dtype, True), name="d lhs")
    if float(jnp.linalg.norm(rr)) > 0:
      op_testing.assert_close(dr, rr, dtype, grad=True, tol=self._tol(dtype, True), name="d rhs")
    else:
      np.testing.assert_array_equal(np.asarray(dr, np.float32), 0.0)

  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("case", sorted(CASES))
  def test_tgmm(self, case, dtype):
    lhs, _, dout, gs = _inputs(case, dtype)
    out = jax.jit(lambda a, b, c: gmm_op.tgmm(a, b, c, **self._kw()))(lhs, dout, gs)
    assert out.shape == (len(gs), lhs.shape[1], dout.shape[1]) and out.dtype == dtype
    ref = reference.tgmm(*_f32(lhs, dout), gs, precision=HIGHEST)
    empty = np.asarray(gs) == 0
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
    if (~empty).any():
      op_testing.assert_close(out, ref, dtype, tol=self._tol(dtype))

  @pytest.mark.parametrize("dtype", DTYPES)
  def test_tgmm_grads(self, dtype):
    lhs, rhs, dout, gs = _inputs("odd_empty_one_partial", dtype)
    loss = lambda a, b: jnp.sum(gmm_op.tgmm(a, b, gs, preferred_element_type=jnp.float32,
                                            **self._kw()) * rhs.astype(jnp.float32))
    ref_loss = lambda a, b: jnp.sum(reference.tgmm(a, b, gs, precision=HIGHEST) *
                                    rhs.astype(jnp.float32))
    got = jax.jit(jax.grad(loss, (0, 1)))(lhs, dout)
    want = jax.grad(ref_loss, (0, 1))(*_f32(lhs, dout))
    for g, w, name in zip(got, want, ("d lhs", "d rhs")):
      op_testing.assert_close(g, w, dtype, grad=True, tol=self._tol(dtype, True), name=name)


class TestGmmXla(GmmTestBase):
  IMPLEMENTATION = "xla"


class TestGmmRaggedDot(GmmTestBase):
  IMPLEMENTATION = "ragged_dot"


# Small tiles so the tiny test shapes span several tiles, straddle group boundaries and
# leave partial tiles in m, k and n.
_SMALL = GmmBlockConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1,
                        tgmm_block_m=16, tgmm_block_k=16, tgmm_block_n=16, tgmm_num_warps=4,
                        tgmm_num_stages=1)
# TPU-legal tiles: the row tile must be a multiple of 8 and the lane tiles of 128.
_SMALL_TPU = GmmBlockConfig(block_m=16, block_n=128, block_k=128, tgmm_block_m=16,
                            tgmm_block_k=128, tgmm_block_n=128)


@pytest.mark.skipif("pallas_triton" not in gmm_op.implementations(),
                    reason="pallas_triton not registered")
class TestGmmPallasTritonInterpret(GmmTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = True
  CONFIG = _SMALL


@pytest.mark.skipif("pallas_tpu" not in gmm_op.implementations(),
                    reason="pallas_tpu not registered")
class TestGmmPallasTpuInterpret(GmmTestBase):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = True
  CONFIG = _SMALL_TPU


@pytest.mark.gpu
class TestGmmPallasTritonGpu(GmmTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  F32_TOL = op_testing.GPU_F32


@pytest.mark.gpu
class TestGmmPallasTritonSmallTilesGpu(GmmTestBase):
  IMPLEMENTATION = "pallas_triton"
  INTERPRET = False
  CONFIG = _SMALL
  F32_TOL = op_testing.GPU_F32


@pytest.mark.gpu
class TestGmmRaggedDotGpu(GmmTestBase):
  IMPLEMENTATION = "ragged_dot"
  F32_TOL = op_testing.GPU_F32


# ---------------------------------------------------------------- Mosaic GPU gmm
# The smallest tiles the kernel takes (64 rows, 128-byte rows of k and n). The kernel needs k
# and n to be multiples of block_k / block_n (x 2 for two compute warpgroups): the cases with
# k rounded up to 64 and n to 128; m stays ragged (multi_tile: four row tiles).
_MGPU_SMALL = GmmBlockConfig(mgpu_block_m=64, mgpu_block_n=64, mgpu_block_k=64, mgpu_stages=2)


# plus row tiles 1..3 (several visits per tile, rows past the sum in the last tile)
_MGPU_CASES = dict(CASES, multi_tile=(200, 72, 128, (30, 0, 90, 1, 60)),
                   # 4 k steps, 2 column tiles, rows past the sum: several tiles per CTA
                   chain_long=(512, 256, 256, (100, 0, 37, 200, 5, 138)))


def _mgpu_inputs(case, dtype, round_k=False):
  """The case with k rounded up to a multiple of 64 (of 128 with round_k: d lhs's n is k)
  and n to a multiple of 128."""
  m, k, n, sizes = _MGPU_CASES[case]
  m = -(-m // 8) * 8          # the lhs TMA descriptor is tiled by 8 rows
  n = -(-n // 128) * 128
  k = -(-k // 128) * 128 if round_k else -(-k // 64) * 64
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  lhs = op_testing.normal(k1, (m, k), dtype)
  rhs = op_testing.normal(k2, (len(sizes), k, n), dtype, scale=k ** -0.5)
  dout = op_testing.normal(k3, (m, n), dtype)
  return lhs, rhs, dout, jnp.asarray(sizes, jnp.int32)


class MosaicGpuGmmBase:
  """gmm forward, tgmm, and both gradients of gmm (d lhs through the kernel's transposed-rhs
  form, d rhs through the Mosaic GPU tgmm). bf16 only: the kernels take 16-bit inputs, f32
  falls through (test_f32_falls_through)."""
  INTERPRET = None
  CONFIG = None
  ONLY_CASES = None   # interpret mode of the 3-warpgroup kernel is slow: a subset in CI
  OTHER_TESTS = True  # grads and tgmm (tgmm has one kernel: the tile config does not reach it)

  def _kw(self, implementation="pallas_mosaic_gpu"):
    return dict(implementation=implementation, interpret=self.INTERPRET, config=self.CONFIG)

  @pytest.mark.parametrize("case", sorted(_MGPU_CASES))
  def test_forward(self, case):
    if self.ONLY_CASES and case not in self.ONLY_CASES:
      pytest.skip(f"{type(self).__name__} runs {self.ONLY_CASES} only")
    lhs, rhs, _, gs = _mgpu_inputs(case, jnp.bfloat16)
    out = jax.jit(lambda a, b, c: gmm_op.gmm(a, b, c, **self._kw()))(lhs, rhs, gs)
    assert out.dtype == jnp.bfloat16 and out.shape == (lhs.shape[0], rhs.shape[2])
    ref = reference.gmm(*_f32(lhs, rhs), gs, precision=HIGHEST)
    op_testing.assert_close(out, ref, jnp.bfloat16)
    tail = int(np.sum(np.asarray(gs)))
    np.testing.assert_array_equal(np.asarray(out[tail:], np.float32), 0.0)

  @pytest.mark.parametrize("case", ["multi_tile", "straddle_full"])
  def test_grads(self, case):
    if not self.OTHER_TESTS:
      pytest.skip(f"{type(self).__name__}: forward only (interpret mode is slow)")
    lhs, rhs, dout, gs = _mgpu_inputs(case, jnp.bfloat16, round_k=True)
    loss = lambda a, b: jnp.sum(gmm_op.gmm(a, b, gs, preferred_element_type=jnp.float32,
                                           **self._kw()) * dout.astype(jnp.float32))
    ref_loss = lambda a, b: jnp.sum(reference.gmm(a, b, gs, precision=HIGHEST) *
                                    dout.astype(jnp.float32))
    dl, dr = jax.jit(jax.grad(loss, (0, 1)))(lhs, rhs)
    rl, rr = jax.grad(ref_loss, (0, 1))(*_f32(lhs, rhs))
    op_testing.assert_close(dl, rl, jnp.bfloat16, grad=True, name="d lhs")
    op_testing.assert_close(dr, rr, jnp.bfloat16, grad=True, name="d rhs")

  @pytest.mark.parametrize("case", sorted(_MGPU_CASES))
  def test_tgmm(self, case):
    if not self.OTHER_TESTS:
      pytest.skip(f"{type(self).__name__}: forward only (interpret mode is slow)")
    lhs, _, dout, gs = _mgpu_inputs(case, jnp.bfloat16, round_k=True)
    out = jax.jit(lambda a, b, c: gmm_op.tgmm(a, b, c, **self._kw()))(lhs, dout, gs)
    assert out.shape == (len(gs), lhs.shape[1], dout.shape[1]) and out.dtype == jnp.bfloat16
    ref = reference.tgmm(*_f32(lhs, dout), gs, precision=HIGHEST)
    empty = np.asarray(gs) == 0
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
    if (~empty).any():
      op_testing.assert_close(out, ref, jnp.bfloat16)

  def test_ragged_k_or_m_falls_through(self):
    lhs, rhs, _, gs = _mgpu_inputs("one_group", jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="k=40 is not a multiple"):
      gmm_op.gmm(lhs[:, :40], rhs[:, :40], gs, **self._kw())
    with pytest.raises(NotImplementedError, match="m=61 rows is not a multiple of 8"):
      gmm_op.gmm(lhs[:61], rhs, jnp.asarray([0, 61, 0], jnp.int32), **self._kw())

  def test_f32_falls_through(self):
    lhs, rhs, _, gs = _mgpu_inputs("one_group", jnp.float32)
    with pytest.raises(NotImplementedError, match="bf16 or f16"):
      gmm_op.gmm(lhs, rhs, gs, **self._kw())
    out = gmm_op.gmm(lhs, rhs, gs, **self._kw(("pallas_mosaic_gpu", "xla")))
    ref = reference.gmm(lhs, rhs, gs, precision=HIGHEST)
    op_testing.assert_close(out, ref, jnp.float32)


@pytest.mark.skipif("pallas_mosaic_gpu" not in gmm_op.implementations(),
                    reason="pallas_mosaic_gpu not registered (no jax Mosaic GPU)")
class TestGmmMosaicGpuInterpret(MosaicGpuGmmBase):
  INTERPRET = True
  CONFIG = _MGPU_SMALL


@pytest.mark.skipif("pallas_mosaic_gpu" not in gmm_op.implementations(),
                    reason="pallas_mosaic_gpu not registered (no jax Mosaic GPU)")
class TestGmmMosaicGpuWarpSpecializedInterpret(MosaicGpuGmmBase):
  INTERPRET = True
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2)
  ONLY_CASES = ("multi_tile", "odd_empty_one_partial")
  OTHER_TESTS = False


@pytest.mark.skipif("pallas_mosaic_gpu" not in gmm_op.implementations(),
                    reason="pallas_mosaic_gpu not registered (no jax Mosaic GPU)")
class TestGmmMosaicGpuSplitMInterpret(MosaicGpuGmmBase):
  """Two compute warpgroups on the rows of a 128-row tile (each 64 rows, one 64-column rhs
  tile): visits whose rows lie in one warpgroup's half, both, or past the sum."""
  INTERPRET = True
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2, mgpu_split_m=1)
  ONLY_CASES = ("multi_tile", "odd_empty_one_partial")
  OTHER_TESTS = False


@pytest.mark.gpu
class TestGmmMosaicGpuSmallTilesGpu(MosaicGpuGmmBase):
  INTERPRET = False
  CONFIG = _MGPU_SMALL


@pytest.mark.gpu
class TestGmmMosaicGpuWarpSpecializedGpu(MosaicGpuGmmBase):
  INTERPRET = False
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2)


@pytest.mark.gpu
class TestGmmMosaicGpuSplitMGpu(MosaicGpuGmmBase):
  INTERPRET = False
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2, mgpu_split_m=1)


@pytest.mark.parametrize("wgs,transpose_rhs,split_m,chain,tile", [
    (1, False, 0, 0, None), (2, False, 0, 0, None), (2, True, 0, 0, None),
    (2, False, 1, 0, None), (2, True, 1, 0, None), (2, False, 0, 1, None),
    (2, True, 0, 1, None), (2, False, 1, 1, None),
    # bench_ops' pallas_mosaic_gpu_split_m64 row: (2 x 64) x 256 CTA tiles
    (2, False, 1, 0, (64, 256)), (2, True, 1, 0, (64, 256))])
def test_mosaic_gpu_gmm_and_tgmm_lower_for_the_gpu(wgs, transpose_rhs, split_m, chain, tile):
  """Default H200 tiles, ragged groups: gmm (forward; transposed rhs = d lhs) and tgmm (d rhs)
  pass Mosaic GPU's layout inference and shared-memory check. A tgmm whose TMA boxes started at
  a group's first row ran in interpret mode and failed only on the GPU (session 10)."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  cfg = GmmBlockConfig.for_device("NVIDIA H200").replace(mgpu_compute_wgs=wgs,
                                                         mgpu_split_m=split_m,
                                                         mgpu_chain_tiles=chain)
  if tile:
    cfg = cfg.replace(mgpu_block_m=tile[0], mgpu_block_n=tile[1])
  m, k, n, g = 520, 256, 384, 5
  lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  rhs = jax.ShapeDtypeStruct((g, n, k) if transpose_rhs else (g, k, n), jnp.bfloat16)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)
  from ops.gmm import pallas_mosaic_gpu
  fwd = functools.partial(pallas_mosaic_gpu.gmm, out_dtype=jnp.bfloat16,
                          transpose_rhs=transpose_rhs, interpret=False, config=cfg)
  text = op_testing.lower_for_gpu(fwd, lhs, rhs, gs).as_text()
  assert "mosaic_gpu" in text
  if wgs == 1:
    dout = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    tg = functools.partial(pallas_mosaic_gpu.tgmm, out_dtype=jnp.float32, interpret=False,
                           config=cfg)
    op_testing.lower_for_gpu(tg, lhs, dout, gs)


def test_mosaic_gpu_tiles_follow_n_and_shared_memory():
  """The H100/H200 defaults resolve to the tiles the session-9 sweep found best."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  from ops.gmm import pallas_mosaic_gpu
  cfg = GmmBlockConfig.for_device("NVIDIA H200")
  resolve = lambda n: pallas_mosaic_gpu._resolve_tiles(cfg, n, 2, 2)
  assert resolve(1408) == (128, 64, 64, 6, 2)      # 1408 = 11 x 128: two 64-column halves
  assert resolve(2048) == (128, 128, 64, 3, 2)
  assert resolve(5632) == (128, 128, 64, 3, 2)
  assert resolve(1400)[1] == 64                    # no 128-byte split divides: kernel refuses
  one_wg = cfg.replace(mgpu_compute_wgs=1, mgpu_block_n=128)
  assert pallas_mosaic_gpu._resolve_tiles(one_wg, 1408, 2, 2) == (128, 128, 64, 6, 1)
  fixed = cfg.replace(mgpu_stages=2)
  assert pallas_mosaic_gpu._resolve_tiles(fixed, 2048, 2, 2)[3] == 2
  # 4 x 48 KiB stages + 64 KiB of output slots exceed shared memory: refused, not miscompiled
  with pytest.raises(NotImplementedError, match="exceed the 230400 bytes of shared memory"):
    pallas_mosaic_gpu._resolve_tiles(cfg.replace(mgpu_stages=4), 2048, 2, 2)
  with pytest.raises(ValueError, match="positive int"):
    GmmBlockConfig(mgpu_stages=-1)


@pytest.mark.gpu
def test_mosaic_gpu_gmm_default_tiles_ragged_groups_gpu():
  """The device-default tiles on a MoE-sized problem with uneven groups, an empty group and
  rows past the sum; both orientations of rhs, and tgmm."""
  m, k, n, e = 3000, 256, 384, 7
  sizes = jnp.asarray([0, 700, 1, 513, 1000, 300, 386], jnp.int32)       # sum 2900 < m
  k1, k2 = jax.random.split(jax.random.key(3))
  lhs = op_testing.normal(k1, (m, k), jnp.bfloat16)
  rhs = op_testing.normal(k2, (e, k, n), jnp.bfloat16, scale=k ** -0.5)
  ref = reference.gmm(*_f32(lhs, rhs), sizes, precision=HIGHEST)
  out = gmm_op.gmm(lhs, rhs, sizes, implementation="pallas_mosaic_gpu")
  op_testing.assert_close(out, ref, jnp.bfloat16)
  from ops.gmm import pallas_mosaic_gpu
  cfg = GmmBlockConfig.for_device(jax.devices()[0].device_kind)
  out_t = pallas_mosaic_gpu.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, out_dtype=jnp.bfloat16,
                                transpose_rhs=True, interpret=False, config=cfg)
  op_testing.assert_close(out_t, ref, jnp.bfloat16)
  dout = op_testing.normal(jax.random.key(4), (m, n), jnp.bfloat16)
  got = pallas_mosaic_gpu.tgmm(lhs, dout, sizes, out_dtype=jnp.float32, interpret=False,
                               config=cfg)
  want = reference.tgmm(*_f32(lhs, dout), sizes, precision=HIGHEST)
  op_testing.assert_close(got, want, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got[0]), 0.0)          # the empty group


# ---------------------------------------------------------------- dispatch
def test_default_dispatch_and_unknown_name():
  lhs, rhs, _, gs = _inputs("odd_empty_one_partial", jnp.float32)
  out = gmm_op.gmm(lhs, rhs, gs)
  op_testing.assert_close(out, reference.gmm(lhs, rhs, gs, precision=HIGHEST), jnp.float32,
                          tol=op_testing.GPU_F32)
  with pytest.raises(ValueError, match="bogus"):
    gmm_op.gmm(lhs, rhs, gs, implementation="bogus")
  with pytest.raises(ValueError):
    gmm_op.gmm(lhs, rhs[:, :3], gs)


def test_tgmm_default_order_by_group_size():
  from ops import _backend
  from ops.gmm import api
  if "pallas_mosaic_gpu" not in gmm_op.implementations():
    pytest.skip("no jax Mosaic GPU")
  with _backend.target("gpu", "NVIDIA H200"):
    assert api._tgmm_order(None, 16384, 8)[:2] == ("pallas_mosaic_gpu", "pallas_triton")
    assert api._tgmm_order(None, 32768, 64) is None      # 512 rows per group: Triton first
    assert api._tgmm_order("pallas_triton", 16384, 8) == "pallas_triton"
  with _backend.target("tpu", "TPU v5 lite"):
    assert api._tgmm_order(None, 16384, 8) is None

def test_sequence_falls_through_unsupported():
  lhs, rhs, _, gs = _inputs("odd_empty_one_partial", jnp.float32)
  # pallas_triton cannot compile on CPU with interpret=False: dispatch moves to "xla".
  if "pallas_triton" in gmm_op.implementations() and jax.default_backend() == "cpu":
    out = gmm_op.gmm(lhs, rhs, gs, implementation=("pallas_triton", "xla"), interpret=False)
    op_testing.assert_close(out, reference.gmm(lhs, rhs, gs, precision=HIGHEST), jnp.float32)


def test_ci_shapes_routing_sizes_sum():
  for name, m, k, n, e, routing_kind in (s for group in shapes.SETS.values() for s in group):
    sizes = shapes.group_sizes_for(m, e, routing_kind)
    assert sizes.shape == (e,) and sizes.sum() == m and (sizes >= 0).all(), name


# ---------------------------------------------------------------- routing helpers
def _routing_inputs(tokens=11, top_k=2, e=5, d=6, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  ids = jax.random.randint(k1, (tokens, top_k), 0, e)
  x = jax.random.normal(k2, (tokens, d))
  w = jax.nn.softmax(jax.random.normal(k3, (tokens, top_k)), -1)
  return ids, x, w


def test_sort_by_group_stable_and_sizes():
  ids = jnp.array([[2, 0], [0, 2], [1, 0], [2, 1]])
  sort_idx, gs = jax.jit(routing.sort_by_group, static_argnums=1)(ids, 3)
  np.testing.assert_array_equal(gs, [3, 2, 3])
  # groups in order, ties by slot (= token * top_k + j) order
  np.testing.assert_array_equal(sort_idx, [1, 2, 5, 4, 7, 0, 3, 6])


def test_sort_by_group_drops_out_of_range():
  ids = jnp.array([[1, 3], [-1, 0]])
  sort_idx, gs = routing.sort_by_group(ids, 2)
  np.testing.assert_array_equal(gs, [1, 1])
  np.testing.assert_array_equal(sort_idx[:2], [3, 0])


@pytest.mark.parametrize("tokens,groups,top_k", [
    (0, 3, 1), (1, 1, 1), (7, 3, 1), (13, 5, 2), (255, 4, 1), (257, 9, 2), (1000, 192, 1),
    (4096, 8, 2), (300, 1, 3)])
def test_sort_by_group_counting_equals_stable_argsort(tokens, groups, top_k):
  """The counting sort (the default) gives the stable argsort's permutation and sizes, across
  block boundaries (256 slots), with out-of-range ids and a single group."""
  ids = jax.random.randint(jax.random.key(tokens + groups), (tokens, top_k), -2, groups + 2)
  want = routing.sort_by_group(ids, groups, method="argsort")
  got = jax.jit(routing.sort_by_group, static_argnums=1)(ids, groups)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="method must be"):
    routing.sort_by_group(ids, groups, method="radix")


def test_permute_unpermute_round_trip_is_weighted_sum():
  ids, x, w = _routing_inputs()
  sort_idx, _ = routing.sort_by_group(ids, 5)
  y = routing.permute(x, sort_idx, 2)
  out = routing.unpermute(y, sort_idx, w)
  np.testing.assert_allclose(out, x * jnp.sum(w, -1, keepdims=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k,drop", [(1, False), (2, False), (2, True)])
def test_permute_unpermute_grads_equal_take_and_use_no_scatter(top_k, drop):
  """The gather-only custom gradients equal jnp.take's (scatter-add) gradients, and the
  backward of the row moves holds no scatter-add (only the int inverse permutation scatters)."""
  ids, x, w = _routing_inputs(tokens=13, top_k=top_k, e=4, d=5, seed=top_k)
  if drop:
    ids = ids.at[3, 1].set(-1).at[7, 0].set(-1)
  sort_idx, _ = routing.sort_by_group(ids, 4)
  inv = routing.inverse_permutation(sort_idx)
  scale = jax.random.normal(jax.random.key(9), (13 * top_k, 5))

  def with_take(x, w):
    y = jnp.take(x, sort_idx // top_k, axis=0) * scale
    u = jnp.take(y, inv, axis=0).reshape(13, top_k, 5)
    return jnp.einsum("tkd,tk->td", u, w, precision=HIGHEST)

  def ours(x, w):
    return routing.unpermute(routing.permute(x, sort_idx, top_k) * scale, sort_idx, w)

  np.testing.assert_allclose(ours(x, w), with_take(x, w), rtol=1e-6, atol=1e-6)
  ct = jax.random.normal(jax.random.key(5), (13, 5))
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * ct), argnums=(0, 1))(x, w)
  g_take = jax.grad(lambda *a: jnp.sum(with_take(*a) * ct), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_take):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(ours(x, w) * ct)))(x))
  assert "scatter-add" not in jaxpr and "scatter_add" not in jaxpr
  assert "scatter-add" in str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(with_take(x, w) * ct)))(x))


@pytest.mark.parametrize("sizes,n,align", [
    ([3, 0, 5, 1], 9, 4),        # an empty group, groups not multiples of align
    ([4, 8], 12, 4),             # already aligned: no padding between groups
    ([2, 3], 7, 8),              # two rows past the groups (dropped assignments)
    ([5, 6, 7], 18, 1),          # align 1: the identity layout
])
def test_aligned_layout_places_each_group_at_a_multiple(sizes, n, align):
  gs = jnp.asarray(sizes, jnp.int32)
  src, dest, padded = jax.jit(routing.aligned_layout, static_argnums=(1, 2))(gs, n, align)
  n_pad = routing.aligned_rows(n, len(sizes), align)
  assert src.shape == (n_pad,) and dest.shape == (n,) and n_pad % align == 0
  np.testing.assert_array_equal(padded, -(-np.asarray(sizes) // align) * align)
  # every sorted row lands once, and the padded row points back at it
  assert len(set(np.asarray(dest).tolist())) == n
  np.testing.assert_array_equal(np.asarray(src)[np.asarray(dest)], np.arange(n))
  assert int(jnp.sum(src >= 0)) == n
  # group g's rows start at the g-th padded offset, a multiple of align, in sorted order
  p_starts = np.cumsum(padded) - np.asarray(padded)
  starts = np.cumsum(sizes) - np.asarray(sizes)
  for g, size in enumerate(sizes):
    assert p_starts[g] % align == 0
    np.testing.assert_array_equal(np.asarray(dest)[starts[g]:starts[g] + size],
                                  p_starts[g] + np.arange(size))
  # rows past the groups follow the last padded group
  past = np.asarray(dest)[sum(sizes):]
  np.testing.assert_array_equal(past, int(np.sum(padded)) + np.arange(n - sum(sizes)))


@pytest.mark.parametrize("impl", ["xla", "pallas_triton"])
def test_aligned_layout_gmm_equals_unaligned_with_grads(impl):
  """gmm on the zero-padded aligned rows, unpadded, equals gmm on the sorted rows: output and
  the gradients of x and w (the padding rows add nothing to tgmm); no scatter-add in the
  backward of the row moves."""
  e, d, f, n, align = 5, 8, 16, 23, 8
  k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
  gs = jnp.asarray([6, 0, 9, 3, 2], jnp.int32)      # 20 of 23 rows grouped, 3 past the groups
  x = jax.random.normal(k1, (n, d))
  w = jax.random.normal(k2, (e, d, f))
  ct = jax.random.normal(k3, (n, f))
  kw = dict(implementation=impl, interpret=True if impl == "pallas_triton" else None)

  def plain(x, w):
    return gmm_op.gmm(x, w, gs, **kw)

  def aligned(x, w):
    src, dest, padded = routing.aligned_layout(gs, n, align)
    y = gmm_op.gmm(routing.pad_rows(x, src, dest), w, padded, **kw)
    return routing.unpad_rows(y, src, dest)

  np.testing.assert_allclose(aligned(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
  g_al = jax.grad(lambda *a: jnp.sum(aligned(*a) * ct), (0, 1))(x, w)
  g_pl = jax.grad(lambda *a: jnp.sum(plain(*a) * ct), (0, 1))(x, w)
  for a, b in zip(g_al, g_pl):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  moves = lambda x: jnp.sum(routing.unpad_rows(
      routing.pad_rows(x, *routing.aligned_layout(gs, n, align)[:2]) * 2.0,
      *routing.aligned_layout(gs, n, align)[:2]) * ct[:, :d])
  jaxpr = str(jax.make_jaxpr(jax.grad(moves))(x))
  assert "scatter-add" not in jaxpr and "scatter_add" not in jaxpr


def test_aligned_layout_rejects_align_below_one():
  with pytest.raises(ValueError, match="align"):
    routing.aligned_layout(jnp.ones((2,), jnp.int32), 2, 0)


def _moe_dense(x, ids, w, experts):
  per = jnp.einsum("td,edf->tef", x, experts, precision=HIGHEST)
  sel = jnp.take_along_axis(per, ids[..., None], axis=1)  # [t, k, f]
  return jnp.einsum("tkf,tk->tf", sel, w, precision=HIGHEST)


@pytest.mark.parametrize("impl", ["xla", "ragged_dot"])
def test_moe_pipeline_matches_dense_with_grads(impl):
  e, d, f = 5, 6, 7
  ids, x, w = _routing_inputs(e=e, d=d)
  experts = jax.random.normal(jax.random.key(3), (e, d, f))

  def moe(x, w, experts):
    sort_idx, gs = routing.sort_by_group(ids, e)
    y = gmm_op.gmm(routing.permute(x, sort_idx, 2), experts, gs, implementation=impl)
    return routing.unpermute(y, sort_idx, w)

  out = jax.jit(moe)(x, w, experts)
  np.testing.assert_allclose(out, _moe_dense(x, ids, w, experts), rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.key(4), out.shape)
  got = jax.grad(lambda *a: jnp.sum(moe(*a) * ct), (0, 1, 2))(x, w, experts)
  want = jax.grad(lambda *a: jnp.sum(_moe_dense(a[0], ids, a[1], a[2]) * ct), (0, 1, 2))(
      x, w, experts)
  for g, r in zip(got, want):
    op_testing.assert_close(g, r, jnp.float32, grad=True)


def test_mosaic_gpu_kernels_refuse_non_hopper_gpus():
  """On an A100 (or any non-sm_90 GPU) the Mosaic GPU kernels step aside for dispatch."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  from ops import _backend
  from ops._mosaic_gpu import require_hopper
  require_hopper(interpret=True)
  with _backend.target("gpu", "NVIDIA A100-SXM4-80GB"):
    with pytest.raises(NotImplementedError, match="need Hopper"):
      require_hopper(interpret=False)
  with _backend.target("gpu", "NVIDIA H100 80GB HBM3"):
    require_hopper(interpret=False)


@pytest.mark.skipif("pallas_mosaic_gpu" not in gmm_op.implementations(),
                    reason="pallas_mosaic_gpu not registered (no jax Mosaic GPU)")
class TestGmmMosaicGpuChainedInterpret(MosaicGpuGmmBase):
  """mgpu_chain_tiles: a CTA's tiles as one chained pipeline (4 CTAs in interpret mode, so
  CTAs with one tile, several, and none; zero rows past the sum in the second loop)."""
  INTERPRET = True
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2, mgpu_chain_tiles=1)
  ONLY_CASES = ("multi_tile", "chain_long", "odd_empty_one_partial")
  OTHER_TESTS = False


@pytest.mark.gpu
class TestGmmMosaicGpuChainedGpu(MosaicGpuGmmBase):
  INTERPRET = False
  CONFIG = _MGPU_SMALL.replace(mgpu_compute_wgs=2, mgpu_chain_tiles=1)


def test_chain_stages_divide_the_k_steps():
  from ops.gmm import pallas_mosaic_gpu as mgpu
  assert mgpu._chain_stages(4, 16) == 4 and mgpu._chain_stages(6, 16) == 4
  assert mgpu._chain_stages(3, 32) == 2 and mgpu._chain_stages(8, 7) == 7
  assert mgpu._chain_stages(4, 1) == 0 and mgpu._chain_stages(5, 5) == 5


def test_triton_gmm_and_tgmm_lower_for_the_gpu():
  """The Pallas Triton gmm (forward and d lhs) and tgmm (d rhs) with the H200 default tiles
  translate to Triton IR on this CPU host (ragged groups, k and n not multiples of the tiles)."""
  cfg = GmmBlockConfig.for_device("NVIDIA H200")
  m, k, n, g = 520, 200, 300, 5
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

  def loss(lhs, rhs, gs):
    out = gmm_op.gmm(lhs, rhs, gs, preferred_element_type=jnp.float32,
                     implementation="pallas_triton", config=cfg)
    return jnp.sum(out)

  text = op_testing.lower_for_gpu(jax.grad(loss, argnums=(0, 1)), sds(m, k), sds(g, k, n),
                                  sds(g, dt=jnp.int32)).as_text()
  assert "tgmm_triton" in text and text.replace("tgmm_triton", "").count("gmm_triton") >= 2


@pytest.mark.skipif("pallas_mosaic_gpu" not in gmm_op.implementations(),
                    reason="pallas_mosaic_gpu not registered (no jax Mosaic GPU)")
@pytest.mark.parametrize("extra", [{}, dict(mgpu_compute_wgs=2),
                                   dict(mgpu_compute_wgs=2, mgpu_split_m=1),
                                   dict(mgpu_compute_wgs=2, mgpu_chain_tiles=1)],
                         ids=["one_wg", "warp_specialized", "split_m", "chained"])
def test_mosaic_gpu_writes_every_row_into_nan_initialised_memory(monkeypatch, extra):
  """Interpret mode zero-fills kernel memory (TMA's zero out-of-bounds reads need that), which
  hides a missing write of the zero rows past sum(group_sizes) or a read of shared memory
  nothing wrote. With m, k, n multiples of every tile nothing is read out of bounds, so memory
  can start as NaN here, as a GPU's starts as garbage: every output row must be written."""
  from ops import _mosaic_gpu
  params = type(_mosaic_gpu.interpret_params())
  monkeypatch.setattr(_mosaic_gpu, "interpret_params",
                      lambda zero_fill_oob=False: params(uninitialized_memory="nan"))
  m, k, n, sizes = 256, 128, 256, (100, 0, 37, 50)      # 69 rows past the groups
  k1, k2 = jax.random.split(jax.random.key(3))
  lhs = op_testing.normal(k1, (m, k), jnp.bfloat16)
  rhs = op_testing.normal(k2, (len(sizes), k, n), jnp.bfloat16, scale=k ** -0.5)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm_op.gmm(lhs, rhs, gs, implementation="pallas_mosaic_gpu", interpret=True,
                   config=_MGPU_SMALL.replace(**extra))
  out = np.asarray(out, np.float32)
  assert not np.isnan(out).any(), f"{np.isnan(out).any(axis=1).sum()} rows hold NaN"
  np.testing.assert_array_equal(out[sum(sizes):], 0.0)
  op_testing.assert_close(out[:sum(sizes)],
                          reference.gmm(*_f32(lhs, rhs), gs, precision=HIGHEST)[:sum(sizes)],
                          jnp.bfloat16)
