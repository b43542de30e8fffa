"""ops.nsa.nsa_decode: the Pallas Triton decode kernels vs the "xla" implementation.

The reference is the "xla" implementation on the inputs cast to f32 (its einsums run at
HIGHEST precision); the selected block indices must equal the reference's exactly.
"""
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import _backend
from ops import nsa as nsa_op
from ops.nsa import decode as decode_mod
from ops.nsa import reference
from ops.nsa.config import NSABlockConfig, NSAConfig
from tests.ops import op_testing as ot

F32, BF16 = jnp.float32, jnp.bfloat16


def make_caches(key, b, h, hk, d, dv, max_len, cfg, dtype, extra_cmp=0):
  ks = jax.random.split(key, 8)
  n_cmp = cfg.n_cmp(max_len) + extra_cmp
  q = ot.normal(ks[0], (b, h, d), dtype)
  kc = ot.normal(ks[1], (b, n_cmp, hk, d), dtype)
  vc = ot.normal(ks[2], (b, n_cmp, hk, dv), dtype)
  k_s = ot.normal(ks[3], (b, max_len, hk, d), dtype)
  v_s = ot.normal(ks[4], (b, max_len, hk, dv), dtype)
  k_w = ot.normal(ks[5], (b, max_len, hk, d), dtype)
  v_w = ot.normal(ks[6], (b, max_len, hk, dv), dtype)
  gates = jax.nn.sigmoid(ot.normal(ks[7], (b, h, 3), F32)).astype(dtype)
  return q, kc, vc, k_s, v_s, k_w, v_w, gates


# (name, batch, heads, kv_heads, head_dim, v_head_dim, cache length, lengths, cfg overrides,
#  extra compressed entries)
SMALL_CASES = [
    # group 1; a row shorter than block_len (no compressed entry yet); a full cache
    ("g1", 2, 2, 2, 16, 16, 64, (64, 7), {}, 0),
    # group 4; lengths differ per row, none a multiple of stride / select_len; cache longer
    ("g4", 3, 8, 2, 32, 32, 112, (5, 37, 99), {}, 0),
    # group 16 (one kv head); compressed cache allocated longer than needed
    ("g16", 2, 16, 1, 16, 16, 80, (80, 45), {}, 5),
    # window not a multiple of the entry size, n_select 3, v head dim != k head dim, cache length
    # not a multiple of 16 (the last entries load clamped offsets)
    ("w20_dv32", 2, 4, 2, 16, 32, 60, (30, 59), {"window": 20, "n_select": 3}, 0),
    # cache shorter than one entry (the caches are padded) and single-token rows
    ("tiny", 2, 4, 1, 16, 16, 12, (12, 1), {}, 0),
]


class NSADecodeTestBase:
  IMPL = "pallas_triton"
  INTERPRET = True
  CFG = NSAConfig.small()
  BCFG = NSABlockConfig.small()
  CASES = SMALL_CASES
  F32_TOL = None

  def tol(self, dtype):
    if dtype == F32 and self.F32_TOL is not None:
      return self.F32_TOL
    return ot.TOL[jnp.dtype(dtype).type]

  def run_case(self, case, dtype, bcfg="default", impl=None):
    name, b, h, hk, d, dv, max_len, lengths, over, extra = case
    cfg = self.CFG.replace(**over)
    bcfg = self.BCFG if bcfg == "default" else bcfg
    key = jax.random.key(zlib.crc32(name.encode()) % 1000)
    args = make_caches(key, b, h, hk, d, dv, max_len, cfg, dtype, extra)
    lengths = jnp.asarray(lengths, jnp.int32)
    kern = jax.jit(functools.partial(
        decode_mod.nsa_decode, cfg=cfg, return_block_idx=True,
        implementation=impl or self.IMPL, interpret=self.INTERPRET, config=bcfg))
    ref = jax.jit(functools.partial(decode_mod.nsa_decode, cfg=cfg, return_block_idx=True,
                                    implementation="xla"))
    o, idx = kern(*args, lengths)
    o_ref, idx_ref = ref(*[x.astype(F32) for x in args], lengths)
    assert o.shape == (b, h, dv) and o.dtype == dtype
    assert idx.shape == (b, hk, cfg.n_select)
    return o, idx, o_ref, idx_ref

  @pytest.mark.parametrize("dtype", [F32, BF16])
  @pytest.mark.parametrize("case", range(len(SMALL_CASES)))
  def test_matches_xla(self, case, dtype):
    o, idx, o_ref, idx_ref = self.run_case(self.CASES[case], dtype)
    np.testing.assert_array_equal(idx, idx_ref)
    ot.assert_close(o, o_ref, dtype, tol=self.tol(dtype), name=self.CASES[case][0])

  @pytest.mark.parametrize("case", [2, 3, 4])   # extra compressed entries, clamped, padded
  def test_stacked_caches(self, case):
    """layer= on caches stacked over 3 layers equals the call on that layer's caches, with a
    traced layer (a scan over layers) and a static one, for this implementation and "xla"."""
    name, b, h, hk, d, dv, max_len, lengths, over, extra = self.CASES[case]
    cfg = self.CFG.replace(**over)
    dtype = BF16
    layers = [make_caches(jax.random.key(i), b, h, hk, d, dv, max_len, cfg, dtype, extra)
              for i in range(3)]
    q, gates = layers[0][0], layers[0][7]
    stacked = [jnp.stack([x[i] for x in layers]) for i in range(1, 7)]
    lengths = jnp.asarray(lengths, jnp.int32)
    for impl in (self.IMPL, "xla"):
      fn = functools.partial(decode_mod.nsa_decode, cfg=cfg, return_block_idx=True,
                             implementation=impl, interpret=self.INTERPRET, config=self.BCFG)
      traced = jax.jit(lambda *a, layer: fn(*a, layer=layer))
      for i in range(3):
        o_want, idx_want = fn(q, *layers[i][1:7], gates, lengths)
        for o, idx in (traced(q, *stacked, gates, lengths, layer=jnp.int32(i)),
                       fn(q, *stacked, gates, lengths, layer=i)):
          np.testing.assert_array_equal(idx, idx_want)
          ot.assert_close(o, o_want, dtype, tol=self.tol(dtype), name=f"{impl} layer {i}")


class TestNSADecodeTritonInterpret(NSADecodeTestBase):

  def test_default_block_config(self):
    """NSABlockConfig() tiles (compressed block 64 > the cache: padded; 16 splits)."""
    o, idx, o_ref, idx_ref = self.run_case(self.CASES[1], F32, bcfg=NSABlockConfig())
    np.testing.assert_array_equal(idx, idx_ref)
    ot.assert_close(o, o_ref, F32)

  @pytest.mark.parametrize("over", [
      {"block_len": 16, "stride": 16, "select_len": 32},   # r = 1: no logit of a previous row
      {"block_len": 64, "stride": 16, "select_len": 16},   # r - 1 = 3 rows back (per = 1)
      {"block_len": 24, "stride": 8, "select_len": 16},    # r = 3, per = 2
  ])
  def test_mapping_geometries(self, over):
    """The selection kernels' overlap taps for block/stride/select-length ratios other than the
    paper's (32/16/64): same blocks and output as the "xla" path."""
    case = ("geom", 2, 8, 2, 16, 16, 200, (200, 97), over, 0)
    o, idx, o_ref, idx_ref = self.run_case(case, F32)
    np.testing.assert_array_equal(idx, idx_ref)
    ot.assert_close(o, o_ref, F32)

  def test_block_indices_match_training(self):
    """Token by token, the kernel's selection and output equal the training path's."""
    cfg, b, t, h, hk, d = self.CFG, 2, 40, 4, 2, 16
    ks = jax.random.split(jax.random.key(3), 8)
    q = ot.normal(ks[0], (b, t, h, d), F32)
    raw = [ot.normal(ks[i], (b, t, hk, d), F32) for i in range(1, 7)]
    gates = jax.nn.sigmoid(ot.normal(ks[7], (b, t, h, 3), F32))
    pool = lambda x: nsa_op.unfold_blocks(x, cfg.block_len, cfg.stride).mean(2)
    args = (q, pool(raw[0]), pool(raw[1]), *raw[2:], gates)
    o_train, idx_train = reference.nsa(*args, cfg=cfg)
    step = jax.jit(functools.partial(decode_mod.nsa_decode, cfg=cfg, return_block_idx=True,
                                     implementation="pallas_triton", interpret=True,
                                     config=self.BCFG))
    for tt in (0, 9, 26, 39):
      lengths = jnp.full((b,), tt + 1, jnp.int32)
      o, idx = step(q[:, tt], *args[1:7], gates[:, tt], lengths)
      np.testing.assert_array_equal(idx, idx_train[:, tt])
      ot.assert_close(o, o_train[:, tt], F32, name=f"t={tt}")

  def test_dispatch(self):
    """CPU default is "xla"; an unsupported head dim falls through to "xla" with a reason."""
    cfg = self.CFG
    args = make_caches(jax.random.key(5), 2, 4, 2, 24, 24, 40, cfg, F32)
    lengths = jnp.asarray([40, 17], jnp.int32)
    want = decode_mod.nsa_decode(*args, lengths, cfg=cfg, implementation="xla")
    np.testing.assert_array_equal(nsa_op.nsa_decode(*args, lengths, cfg=cfg), want)
    got = nsa_op.nsa_decode(*args, lengths, cfg=cfg, implementation=("pallas_triton", "xla"),
                            interpret=True)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(NotImplementedError, match="head dims 24/24"):
      nsa_op.nsa_decode(*args, lengths, cfg=cfg, implementation="pallas_triton",
                        interpret=True)
    with pytest.raises(ValueError, match="unknown implementation"):
      nsa_op.nsa_decode(*args, lengths, cfg=cfg, implementation="nope")
    with pytest.raises(ValueError, match=r"k_cmp must be \[layers, b, n, kvh, d\]"):
      nsa_op.nsa_decode(*args, lengths, cfg=cfg, layer=0)
    two = [args[0]] + [jnp.stack([x, x]) for x in args[1:7]] + [args[7]]
    with pytest.raises(ValueError, match="layer 2 outside the stacked cache's 2 layers"):
      nsa_op.nsa_decode(*two, lengths, cfg=cfg, layer=2)
    assert decode_mod.DECODE.candidates(None) == ("xla",)

  def test_lowers_for_cuda(self):
    """The kernels lower to Triton for an H100 at the benchmark shape (64k cache, batch 8,
    64/4 heads, D128, bf16): five Triton calls. With jaxlib <= 0.10.2 lowering only emits the
    Triton IR (no GPU needed); newer jaxlib compiles it in-process, which needs the GPU."""
    import jaxlib
    newer = tuple(int(re.match(r"\d+", x).group()) for x in
                  jaxlib.__version__.split(".")[:3]) > (0, 10, 2)
    if newer and not any(dev.platform == "gpu" for dev in jax.devices()):
      pytest.skip(f"jaxlib {jaxlib.__version__} compiles Triton while lowering: needs a GPU")
    cfg = NSAConfig()
    b, h, hk, d, t = 8, 64, 4, 128, 65536
    sds = jax.ShapeDtypeStruct
    bf = BF16
    args = ([sds((b, h, d), bf)] + [sds((b, cfg.n_cmp(t), hk, d), bf)] * 2
            + [sds((b, t, hk, d), bf)] * 4 + [sds((b, h, 3), bf), sds((b,), jnp.int32)])
    fn = functools.partial(decode_mod.nsa_decode, cfg=cfg, implementation="pallas_triton",
                           interpret=False)
    with _backend.target("gpu", "NVIDIA H100 80GB HBM3"):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 5, "expected the five Triton kernels in the lowered module"


# Paper block sizes at short caches; the same 5 slots as SMALL_CASES (test parametrisation).
GPU_CASES = [
    ("g1", 2, 4, 4, 128, 128, 2048, (2048, 21), {}, 0),
    ("g4", 3, 16, 4, 64, 64, 3000, (1000, 2999, 77), {}, 0),
    ("g16", 4, 64, 4, 128, 128, 4096, (4096, 2500, 513, 64), {}, 7),
    ("w300", 2, 32, 2, 128, 128, 1500, (1500, 640), {"window": 300, "n_select": 8}, 0),
    ("short", 2, 16, 1, 64, 64, 40, (40, 1), {}, 0),
]


@pytest.mark.gpu
class TestNSADecodeTritonGPU(NSADecodeTestBase):
  INTERPRET = False
  CFG = NSAConfig()
  BCFG = None
  CASES = GPU_CASES
  F32_TOL = ot.GPU_F32


class TestNSADecodeFusedTopnInterpret(NSADecodeTestBase):
  """decode_fuse_topn: scores and top-n in one kernel (the group's heads summed in a loop)."""
  BCFG = NSABlockConfig.small().replace(decode_fuse_topn=True)


@pytest.mark.gpu
class TestNSADecodeFusedTopnGPU(TestNSADecodeTritonGPU):
  BCFG = NSABlockConfig.for_device("h200").replace(decode_fuse_topn=True)
