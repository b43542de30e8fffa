"""ops.lif.lif: every implementation against the lax.scan + custom_jvp reference (f32)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops.lif import LifConfig, implementations, lif, reference
from tests.ops import op_testing

SMALL = LifConfig(block_c=32, time_chunk=4, ckpt_every=2, num_warps=1, bwd_block_c=32,
                  bwd_num_warps=1, tpu_block_c=128, tpu_block_t=8)
# Compiled GPU cases: a short prefetch ring compiles in seconds (the device default unrolls 64
# steps, ~50 s per kernel); test_large runs the device default.
GPU_SMALL = LifConfig(block_c=32, time_chunk=8, ckpt_every=4, num_warps=1, bwd_block_c=32,
                      bwd_num_warps=1)


def _inputs(B, T, C, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  # scale 1.2: plenty of spikes, some clamping at +-3.
  x = op_testing.normal(k[0], (B, T, C), dtype, scale=1.2)
  v0 = op_testing.normal(k[1], (B, C), jnp.float32)
  g = op_testing.normal(k[2], (B, T, C), dtype)
  gv = op_testing.normal(k[3], (B, C), jnp.float32)
  return x, v0, g, gv


def _ref(x, v0, **kw):
  return reference.lif(x.astype(jnp.float32), None if v0 is None else v0.astype(jnp.float32),
                       **kw)


def _grads(fn, x, v0, g, gv):
  def loss(x, v0):
    s, v_last = fn(x, v0)
    return jnp.sum(s.astype(jnp.float32) * g.astype(jnp.float32)) + jnp.sum(v_last * gv)
  return jax.grad(loss, argnums=(0, 1))(x, v0)


def _fwd_bwd_ir(cfg, shape, **options):
  """Triton IR text of lif's forward and backward at cfg (and lif's options), built on this
  host."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)

  def fwd_bwd(x):
    s, vjp = jax.vjp(lambda x: lif(x, implementation="pallas_triton", config=cfg,
                                   **options)[0], x)
    return vjp(s)
  return op_testing.lower_for_gpu(fwd_bwd, x).as_text()


def _check_large(cfg, spikes=False):
  """Compiled on the GPU at B2 T1000 C1000: gradients (and spikes) against the reference."""
  f = functools.partial(lif, implementation="pallas_triton", interpret=False, config=cfg)
  x, v0, g, gv = _inputs(2, 1000, 1000, jnp.float32)
  if spikes:
    s, _ = f(x, v0)
    assert float(jnp.mean(s != _ref(x, v0)[0])) < 1e-4   # a rare 1-ulp threshold tie
  got = jax.jit(lambda *a: _grads(f, *a))(x, v0, g, gv)
  want = _grads(_ref, x, v0, g, gv)
  for name, a, b in zip(("dx", "dv0"), got, want):
    op_testing.assert_close(a, b, jnp.float32, grad=True, name=name)


class LifTestBase:
  IMPL = "xla"
  INTERPRET = None
  CONFIG = None

  def lif(self, x, v0=None, **kw):
    return lif(x, v0, implementation=self.IMPL, interpret=self.INTERPRET, config=self.CONFIG,
               **kw)

  @pytest.mark.parametrize("B,T,C,dtype,reset", [
      (1, 1, 40, jnp.float32, "hard"),
      (2, 7, 130, jnp.float32, "subtract"),
      (2, 100, 72, jnp.float32, "hard"),
      (1, 100, 130, jnp.bfloat16, "hard"),
      # whole tiles of time and channels for every test config (no partial tile anywhere)
      (2, 16, 64, jnp.float32, "subtract"),
      (1, 32, 96, jnp.bfloat16, "hard"),
  ])
  def test_forward(self, B, T, C, dtype, reset):
    x, v0, _, _ = _inputs(B, T, C, dtype)
    s, v_last = jax.jit(functools.partial(self.lif, reset=reset))(x, v0)
    s_ref, v_ref = _ref(x, v0, reset=reset)
    assert s.dtype == x.dtype and s.shape == x.shape
    assert v_last.dtype == jnp.float32 and v_last.shape == (B, C)
    s_np = np.asarray(s.astype(jnp.float32))
    assert set(np.unique(s_np)) <= {0.0, 1.0}
    assert 0.02 < s_np.mean() < 0.5, "test inputs should spike sometimes"
    # Inputs are exactly representable in f32 after the bf16 cast, and every implementation
    # computes in f32 with the same operations: spikes agree exactly.
    np.testing.assert_array_equal(s_np, np.asarray(s_ref.astype(jnp.float32)))
    op_testing.assert_close(v_last, v_ref, jnp.float32, name="v_last")

  @pytest.mark.parametrize("surrogate,reset,detach,dtype,T", [
      ("atan", "hard", True, jnp.float32, 9),
      ("atan", "hard", False, jnp.float32, 7),
      ("sigmoid", "subtract", True, jnp.float32, 9),
      ("sigmoid", "hard", False, jnp.float32, 1),
      ("triangle", "subtract", False, jnp.float32, 9),
      ("triangle", "hard", True, jnp.float32, 9),
      ("atan", "subtract", False, jnp.bfloat16, 33),
  ])
  def test_grads(self, surrogate, reset, detach, dtype, T):
    x, v0, g, gv = _inputs(2, T, 72, dtype, seed=1)
    kw = dict(surrogate=surrogate, reset=reset, detach_reset=detach, surrogate_alpha=2.0)
    got = jax.jit(lambda *a: _grads(functools.partial(self.lif, **kw), *a))(x, v0, g, gv)
    want = _grads(functools.partial(_ref, **kw), x, v0, g, gv)
    for name, a, b, primal in zip(("dx", "dv0"), got, want, (x, v0)):
      assert a.dtype == primal.dtype and a.shape == primal.shape, name
      tol = op_testing.TOL[jnp.dtype(dtype).type] * op_testing.GRAD_FACTOR
      op_testing.assert_close(a, b, dtype, tol=tol, name=name)

  def test_grads_whole_tiles(self):
    # T and C multiples of every test config's time_chunk, ckpt_every and block_c
    x, v0, g, gv = _inputs(2, 16, 64, jnp.float32, seed=3)
    got = jax.jit(lambda *a: _grads(self.lif, *a))(x, v0, g, gv)
    want = _grads(_ref, x, v0, g, gv)
    tol = op_testing.TOL[jnp.float32] * op_testing.GRAD_FACTOR
    for name, a, b in zip(("dx", "dv0"), got, want):
      op_testing.assert_close(a, b, jnp.float32, tol=tol, name=name)

  def test_detach_changes_gradient(self):
    x, v0, g, gv = _inputs(1, 9, 40, jnp.float32, seed=2)
    f = lambda d: _grads(functools.partial(self.lif, detach_reset=d), x, v0, g, gv)[0]
    assert float(jnp.abs(f(True) - f(False)).max()) > 1e-3

  def test_chunked_equals_unchunked(self):
    x, v0, _, _ = _inputs(2, 23, 40, jnp.float32)
    s, v_last = self.lif(x, v0, reset="subtract")
    s1, v1 = self.lif(x[:, :10], v0, reset="subtract")
    s2, v2 = self.lif(x[:, 10:], v1, reset="subtract")
    np.testing.assert_array_equal(s, jnp.concatenate([s1, s2], 1))
    np.testing.assert_allclose(v_last, v2, rtol=1e-6, atol=1e-6)

  def test_v0_none_and_options(self):
    x, _, _, _ = _inputs(1, 7, 40, jnp.float32)
    kw = dict(beta=0.8, threshold=0.5, v_min=-1.0, v_max=1.0)
    s, v = self.lif(x, **kw)
    s_ref, v_ref = _ref(x, None, **kw)
    np.testing.assert_array_equal(s, s_ref)
    op_testing.assert_close(v, v_ref, jnp.float32)


class TestLifXla(LifTestBase):
  IMPL = "xla"


class TestLifTritonInterpret(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = SMALL


class TestLifTpuInterpret(LifTestBase):
  IMPL = "pallas_tpu"
  INTERPRET = True
  CONFIG = SMALL


@pytest.mark.gpu
class TestLifTritonGpu(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = False
  CONFIG = GPU_SMALL

  def test_large(self):
    _check_large(None, spikes=True)           # the device's default block sizes



# A forward prefetch ring of several chunks (prefetch_chunks > 1): T=1, 7, 9 end inside the
# first chunk, T=100 runs past the ring many times; the gradient tests check the checkpoints it
# writes.
class TestLifTritonPrefetchInterpret(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, prefetch_chunks=3)
  test_detach_changes_gradient = None


@pytest.mark.gpu
class TestLifTritonPrefetchGpu(TestLifTritonGpu):
  CONFIG = dataclasses.replace(GPU_SMALL, prefetch_chunks=2)
  test_large = None


def test_prefetch_forward_lowers_for_the_gpu():
  """Triton IR of the forward with two chunks of 64 rows in flight (the device-sized ring)."""
  cfg = dataclasses.replace(LifConfig.for_device("NVIDIA H200"), prefetch_chunks=2)
  x = jax.ShapeDtypeStruct((1, 300, 96), jnp.float32)
  text = op_testing.lower_for_gpu(
      lambda x: lif(x, implementation="pallas_triton", config=cfg)[0], x).as_text()
  assert "lif_fwd" in text


def test_prefetch_chunks_is_checked():
  with pytest.raises(ValueError, match="prefetch_chunks"):
    LifConfig(prefetch_chunks=0)


# The time-segment backward (bwd_segment > 0): segments of 4 / 8 steps, so T=9, 33 and 100 end
# in a partial segment; C=72 and 130 end in a partial channel block; B=2 interleaves two chains.
class TestLifTritonSegmentsInterpret(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, bwd_segment=4)
  # bwd_segment changes only the backward: the forward cases are TestLifTritonInterpret's
  test_forward = test_chunked_equals_unchunked = test_v0_none_and_options = None
  test_detach_changes_gradient = None


def test_lookback_backward_interpret():
  """In interpret mode earlier segments have all finished, so look-back ends at its first read
  (tests/ops/test_triton_chain.py folds unfinished ones); one case checks the plumbing."""
  cfg = dataclasses.replace(SMALL, bwd_segment=4, lookback=True)
  f = functools.partial(lif, implementation="pallas_triton", interpret=True, config=cfg,
                        reset="subtract", detach_reset=False)
  x, v0, g, gv = _inputs(2, 11, 40, jnp.float32, seed=3)
  got = jax.jit(lambda *a: _grads(f, *a))(x, v0, g, gv)
  want = _grads(functools.partial(_ref, reset="subtract", detach_reset=False), x, v0, g, gv)
  for name, a, b in zip(("dx", "dv0"), got, want):
    op_testing.assert_close(a, b, jnp.float32, grad=True, name=name)


@pytest.mark.gpu
class TestLifTritonSegmentsGpu(LifTestBase):
  """Runs the atomic hand-off between programs (interpret mode uses plain loads/stores)."""
  IMPL = "pallas_triton"
  INTERPRET = False
  CONFIG = dataclasses.replace(GPU_SMALL, bwd_segment=8)

  def test_many_segments(self):
    # 2 x 63 segments x 32 channel blocks: thousands of programs wait on each other.
    _check_large(dataclasses.replace(self.CONFIG, bwd_segment=16))


def test_lookback_refused_when_compiled():
  """The look-back backward crashed the Triton compiler on the H200: refused outside
  interpret mode, so dispatch moves on instead of crashing the process."""
  cfg = dataclasses.replace(LifConfig.for_device("NVIDIA H200"), bwd_segment=32, lookback=True)
  x = jax.ShapeDtypeStruct((1, 200, 300), jnp.float32)
  with pytest.raises(NotImplementedError, match="lookback"):
    op_testing.lower_for_gpu(lambda x: lif(x, implementation="pallas_triton", config=cfg)[0], x)


def test_replay_merge_with_prefetch_refused_when_compiled():
  """The replay backward's merge walk on prefetched rows segfaulted the Triton compiler on the
  H200 (session 18): refused before any compile; each way out of it lowers."""
  cfg = dataclasses.replace(LifConfig.for_device("NVIDIA H200"), fixup_merge=True)
  x = jax.ShapeDtypeStruct((1, 200, 300), jnp.float32)
  with pytest.raises(NotImplementedError, match="fixup_merge"):
    op_testing.lower_for_gpu(lambda x: lif(x, implementation="pallas_triton", config=cfg)[0], x)
  for fix in (dict(bwd_replay_prefetch=False), dict(bwd_replay=0), dict(fixup_merge=False)):
    assert "lif_fwd" in _fwd_bwd_ir(dataclasses.replace(cfg, **fix), (1, 200, 300))
  # a subtract reset never takes the replay backward: nothing to refuse
  assert "lif_bwd_segments" in _fwd_bwd_ir(cfg, (1, 200, 300), reset="subtract")


def test_segment_backward_lowers_for_the_gpu():
  """The Triton IR of the segment backward (atomic tickets, the spin loop) at a device-sized
  config, built on this host."""
  cfg = dataclasses.replace(LifConfig.for_device("NVIDIA H200"), bwd_segment=32, bwd_replay=0)
  assert "lif_bwd_segments" in _fwd_bwd_ir(cfg, (1, 200, 300))


def test_segment_config_is_checked():
  with pytest.raises(ValueError, match="bwd_segment .6. must be 0 or a positive multiple"):
    LifConfig(ckpt_every=4, time_chunk=8, bwd_segment=6)
  with pytest.raises(ValueError, match="must be <= 256"):
    LifConfig(ckpt_every=4, time_chunk=8, bwd_segment=512)

# The time-segment forward (segment > 0): 8-step segments whose starts come from replaying 4
# steps of the segment before, so T=7 is one segment, T=9, 23, 33 and 100 end in a partial one,
# and with v0 drawn from N(0, 1) segment 0's replay guess is often wrong; the gradient tests
# check the checkpoints it writes.
class TestLifTritonFwdSegmentsInterpret(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, segment=8, segment_replay=4, segment_chunk=4)


class TestLifTritonFwdSegmentsMergeInterpret(TestLifTritonFwdSegmentsInterpret):
  CONFIG = dataclasses.replace(TestLifTritonFwdSegmentsInterpret.CONFIG, fixup_merge=True)


def _fwd_segments(x, v0, cfg, **kw):
  """(spikes, v_last, fix-up passes run) of the segment forward, interpret mode."""
  from ops.lif import pallas_triton_fwd_segments as fs
  from ops.lif.pallas_triton import _compiler_params
  p = dict(beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard", surrogate="atan",
           alpha=2.0, detach_reset=True)
  p.update(kw)
  (s, v_last), n = jax.jit(lambda x, v0: fs.run(x, v0, p, False, True, cfg,
                                                _compiler_params(1, 1)))(x, v0)
  return s, v_last, int(n)


@pytest.mark.parametrize("replay,scale,reset,fixed_up", [
    (0, 1.2, "hard", True),        # no replay: every start guessed as 0
    (4, 0.3, "hard", True),        # rare spikes: trajectories merge late
    (4, 1.2, "subtract", None),    # subtract reset does not forget the state at a spike
    (8, 1.2, "hard", None),
])
@pytest.mark.parametrize("merge", [False, True])
def test_fwd_segments_fix_up_is_exact(replay, scale, reset, fixed_up, merge):
  """Wherever the replayed guesses are wrong the fix-up passes make the output exact."""
  cfg = dataclasses.replace(SMALL, segment=8, segment_replay=replay, segment_chunk=4,
                            fixup_merge=merge)
  k = jax.random.split(jax.random.key(5), 2)
  x = scale * jax.random.normal(k[0], (2, 61, 72), jnp.float32)
  v0 = 2.0 * jax.random.normal(k[1], (2, 72), jnp.float32)
  s, v_last, passes = _fwd_segments(x, v0, cfg, reset=reset)
  s_ref, v_ref = _ref(x, v0, reset=reset)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
  op_testing.assert_close(v_last, v_ref, jnp.float32, name="v_last")
  assert passes <= 7                      # 8 segments: pass i makes segment i exact
  if fixed_up:
    assert passes > 0, "the first pass was already exact: the case does not test the fix-up"


@pytest.mark.parametrize("merge", [False, True])
def test_fwd_segments_fix_up_rewrites_the_checkpoints(merge):
  """The checkpoints the backward reads equal the serial forward's after fix-up passes."""
  from ops.lif import pallas_triton as pt
  from ops.lif import pallas_triton_fwd_segments as fs
  cfg = dataclasses.replace(SMALL, segment=8, segment_replay=0, segment_chunk=4,
                            fixup_merge=merge)
  p = dict(beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard", surrogate="atan",
           alpha=2.0, detach_reset=True)
  k = jax.random.split(jax.random.key(9), 2)
  x = 0.5 * jax.random.normal(k[0], (2, 45, 40), jnp.float32)
  v0 = 2.0 * jax.random.normal(k[1], (2, 40), jnp.float32)
  (s, v_last, ck), n = jax.jit(lambda x, v0: fs.run(x, v0, p, True, True, cfg,
                                                    pt._compiler_params(1, 1)))(x, v0)
  s_ser, v_ser, ck_ser = jax.jit(lambda x, v0: pt._forward(x, v0, p, True, True, SMALL))(x, v0)
  assert int(n) > 0
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ser))
  np.testing.assert_array_equal(np.asarray(ck), np.asarray(ck_ser))
  np.testing.assert_array_equal(np.asarray(v_last), np.asarray(v_ser))


def test_fwd_segments_fix_up_walk_stops_where_it_meets_the_earlier_walk():
  """A fix-up walk stops at the first chunk whose starting state equals the checkpoint its
  earlier walk stored there: the spikes after it are left as they were (poisoned here to see
  that they are not rewritten); the first chunk is rewritten and exact. In inference too (the
  checkpoints are kept internally)."""
  from ops.lif import pallas_triton as pt
  from ops.lif import pallas_triton_fwd_segments as fs
  # no replay: segment 1 starts from v = 0 instead of segment 0's end
  cfg = dataclasses.replace(SMALL, segment=32, segment_replay=0, segment_chunk=4,
                            fixup_merge=True)
  p = dict(beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard", surrogate="atan",
           alpha=2.0, detach_reset=True)
  k = jax.random.split(jax.random.key(12), 2)
  x = 3.0 * jax.random.normal(k[0], (1, 96, 32), jnp.float32)   # spikes / clamps: merges fast
  v0 = 2.0 * jax.random.normal(k[1], (1, 32), jnp.float32)
  cp = pt._compiler_params(1, 1)

  @jax.jit
  def passes(x, v0):
    s, end, used, ck = fs.first_pass(x, v0, p, False, True, cfg, cp)
    poisoned = s.at[:, 32:64].set(jnp.nan)
    return s, fs.fix_up_pass(x, v0, (poisoned, end, used, ck), p, False, True, cfg, cp)[0]

  first, fixed = passes(x, v0)
  want = np.asarray(_ref(x, v0)[0])
  assert not np.array_equal(np.asarray(first[:, 32:36]), want[:, 32:36])   # needed the fix
  np.testing.assert_array_equal(np.asarray(fixed[:, 32:36]), want[:, 32:36])
  assert bool(jnp.all(jnp.isnan(fixed[:, 48:64]))), "the walk did not stop early"
  np.testing.assert_array_equal(np.asarray(fixed[:, :32]), want[:, :32])


def test_fwd_segments_idle_fix_up_on_strong_input():
  """Input that spikes often (the bench's) merges within the replay: no fix-up pass runs."""
  cfg = dataclasses.replace(SMALL, segment=64, segment_replay=64, segment_chunk=4)
  x = 1.2 * jax.random.normal(jax.random.key(6), (1, 256, 64), jnp.float32)
  s, _, passes = _fwd_segments(x, jnp.zeros((1, 64), jnp.float32), cfg)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(_ref(x, None)[0]))
  assert passes == 0


def test_fwd_segment_config_is_checked():
  with pytest.raises(ValueError, match="segment .12. must be 0 or a positive multiple"):
    LifConfig(ckpt_every=4, segment_chunk=8, segment=12)
  with pytest.raises(ValueError, match="segment_replay .4. must be 0 or a positive multiple"):
    LifConfig(ckpt_every=4, segment_chunk=8, segment=16, segment_replay=4)
  with pytest.raises(ValueError, match="segment_replay .16. must be <= segment"):
    LifConfig(ckpt_every=4, segment_chunk=8, segment=8, segment_replay=16)
  with pytest.raises(ValueError, match="segment_chunk .6. must be a positive multiple"):
    LifConfig(ckpt_every=4, segment_chunk=6, segment=12)
  LifConfig(ckpt_every=32, time_chunk=32)   # segment_chunk is only checked when used
  LifConfig(ckpt_every=4, time_chunk=24)    # the replay length is only checked when used


@pytest.mark.parametrize("merge", [False, True])
def test_fwd_segments_lower_for_the_gpu(merge):
  """Triton IR of the segment forward and its fix-up pass at the device tiles."""
  text = _fwd_bwd_ir(dataclasses.replace(LifConfig.for_device("NVIDIA H200"), segment=256,
                                         fixup_merge=merge, bwd_replay=0), (1, 1000, 96))
  assert "lif_fwd_segments" in text and "lif_fwd_segments_fixup" in text


# The backward from replayed carries (bwd_replay > 0): 8-step segments replaying 4 steps of
# the next, so T=9, 33 and 100 end in a partial segment; subtract reset / detach_reset=False
# cases take the chained kernel (the carry is never forgotten there).
class TestLifTritonBwdReplayInterpret(LifTestBase):
  IMPL = "pallas_triton"
  INTERPRET = True
  CONFIG = dataclasses.replace(SMALL, bwd_replay_segment=8, bwd_replay=4, bwd_replay_block_c=32,
                               bwd_replay_num_warps=1)
  # bwd_replay changes only the backward: the forward cases are TestLifTritonInterpret's
  test_forward = test_chunked_equals_unchunked = test_v0_none_and_options = None


class TestLifTritonBwdReplayNoPrefetchInterpret(TestLifTritonBwdReplayInterpret):
  CONFIG = dataclasses.replace(TestLifTritonBwdReplayInterpret.CONFIG, bwd_replay_prefetch=False)


class TestLifTritonBwdReplayMergeInterpret(TestLifTritonBwdReplayInterpret):
  CONFIG = dataclasses.replace(TestLifTritonBwdReplayInterpret.CONFIG, fixup_merge=True)


def _bwd_replay(x, v0, g, gv, cfg, max_fixups=None):
  """(dx, dv0, fix-up passes) of the replay backward (interpret mode), hard reset, detached,
  with the checkpoints of the serial forward."""
  from ops.lif import pallas_triton as pt
  from ops.lif import pallas_triton_bwd_replay as br
  p = dict(beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard", surrogate="atan",
           alpha=2.0, detach_reset=True)
  serial = dataclasses.replace(cfg, bwd_replay=0)

  @jax.jit
  def f(x, v0, g, gv):
    _, _, ckpt = pt._forward(x, v0, p, True, True, serial)
    return br.run(x, ckpt, g, gv, p, True, cfg, pt._compiler_params(1, 1), max_fixups)
  (dx, dv0), n = f(x, v0, g, gv)
  return dx, dv0, int(n)


@pytest.mark.parametrize("replay,scale,fixed_up,prefetch", [
    (0, 1.2, True, True),       # no replay: every carry guessed as zero
    (4, 0.3, True, True),       # rare spikes: the carry is forgotten late
    (4, 0.3, True, False),      # the same, each chunk's rows loaded when it is walked
    (8, 1.2, None, True),
])
@pytest.mark.parametrize("merge", [False, True])
def test_bwd_replay_fix_up_matches_the_reference(replay, scale, fixed_up, prefetch, merge):
  cfg = dataclasses.replace(SMALL, bwd_replay_segment=8, bwd_replay=replay,
                            bwd_replay_block_c=32, bwd_replay_prefetch=prefetch,
                            fixup_merge=merge)
  k = jax.random.split(jax.random.key(7), 4)
  x = scale * jax.random.normal(k[0], (2, 61, 72), jnp.float32)
  v0 = jax.random.normal(k[1], (2, 72), jnp.float32)
  g = jax.random.normal(k[2], (2, 61, 72), jnp.float32)
  gv = jax.random.normal(k[3], (2, 72), jnp.float32)
  dx, dv0, passes = _bwd_replay(x, v0, g, gv, cfg)
  want = _grads(_ref, x, v0, g, gv)
  for name, a, b in zip(("dx", "dv0"), (dx, dv0), want):
    op_testing.assert_close(a, b, jnp.float32, grad=True, name=name)
  assert passes <= 7
  if fixed_up:
    assert passes > 0, "the first pass was already right: the case does not test the fix-up"
    # and the fix-up is what made it right
    dx0, _, _ = _bwd_replay(x, v0, g, gv, cfg, max_fixups=0)
    assert float(jnp.max(jnp.abs(dx0 - want[0]))) > 1e-3


def test_bwd_replay_idle_fix_up_on_strong_input():
  """Bench-like input (a 10% spike rate) forgets the carry within the replay: no fix-up."""
  cfg = dataclasses.replace(SMALL, bwd_replay_segment=64, bwd_replay=64, bwd_replay_block_c=32)
  k = jax.random.split(jax.random.key(8), 2)
  x = 1.2 * jax.random.normal(k[0], (1, 256, 64), jnp.float32)
  g = jax.random.normal(k[1], (1, 256, 64), jnp.float32)
  z = jnp.zeros((1, 64), jnp.float32)
  dx, _, passes = _bwd_replay(x, z, g, z, cfg)
  op_testing.assert_close(dx, _grads(_ref, x, z, g, z)[0], jnp.float32, grad=True)
  assert passes == 0


def test_bwd_replay_config_is_checked():
  with pytest.raises(ValueError, match="bwd_replay .8. must be 0 or a positive multiple"):
    LifConfig(bwd_replay=8)
  with pytest.raises(ValueError, match="bwd_replay .64. must be <= bwd_replay_segment .32."):
    LifConfig(bwd_replay_segment=32, bwd_replay=64)
  with pytest.raises(ValueError, match="bwd_replay_segment .40. must be a positive multiple"):
    LifConfig(bwd_replay_segment=40, bwd_replay=16, ckpt_every=16)
  with pytest.raises(ValueError, match="bwd_replay_block_c must be a power of 2"):
    LifConfig(bwd_replay=16, bwd_replay_block_c=96)
  with pytest.raises(ValueError, match="bwd_segment .512. must be <= 256"):
    LifConfig(bwd_segment=512)
  LifConfig(bwd_replay_segment=1024, bwd_replay=128)   # walked in chunks: past 256 is fine


@pytest.mark.parametrize("merge", [False, True])
def test_bwd_replay_lowers_for_the_gpu(merge):
  text = _fwd_bwd_ir(dataclasses.replace(LifConfig.for_device("NVIDIA H200"),
                                         bwd_replay_segment=512, bwd_replay=128,
                                         fixup_merge=merge, bwd_replay_prefetch=not merge),
                     (1, 1000, 96))
  assert "lif_bwd_replay" in text and "lif_bwd_replay_fixup" in text


@pytest.mark.parametrize("options", [dict(reset="subtract"), dict(detach_reset=False)])
def test_bwd_replay_leaves_other_resets_to_the_chain(options):
  """The carry is forgotten only under a detached hard reset: other resets keep the chained
  backward, on its own tiles, whatever bwd_replay says."""
  cfg = dataclasses.replace(LifConfig.for_device("NVIDIA H200"), bwd_replay=64)
  text = _fwd_bwd_ir(cfg, (1, 1000, 96), **options)
  assert "lif_bwd_segments" in text and "lif_bwd_replay" not in text


@pytest.mark.gpu
class TestLifTritonBwdReplayGpu(TestLifTritonGpu):
  CONFIG = dataclasses.replace(GPU_SMALL, bwd_replay_segment=16, bwd_replay=8,
                               bwd_replay_block_c=32, bwd_replay_num_warps=1)
  test_large = None

  def test_large_replay(self):
    _check_large(dataclasses.replace(LifConfig.for_device("NVIDIA H200"),
                                     bwd_replay_segment=512, bwd_replay=128))


_COMPILE_PROBE = """
import dataclasses, jax, jax.numpy as jnp
from ops.lif import LifConfig, lif
cfg = dataclasses.replace(LifConfig.for_device(jax.devices()[0].device_kind), {overrides})
x = jnp.full((1, 256, 256), 1.2, jnp.float32)
f = jax.grad(lambda x: jnp.sum(lif(x, implementation="pallas_triton", config=cfg)[0]))
jax.block_until_ready(jax.jit(f)(x))
"""


def _compiles_in_a_subprocess(overrides: str, timeout: int = 300):
  """Fails the test (instead of killing the whole pytest run) when compiling lif's fwd + bwd at
  the device config with `overrides` crashes or hangs, as Triton's compiler did for some."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root)
  try:
    proc = subprocess.run([sys.executable, "-c", _COMPILE_PROBE.format(overrides=overrides)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.fail(f"compiling lif with {overrides} took over {timeout} s")
  if proc.returncode:
    pytest.fail(f"compiling lif with {overrides} failed (rc {proc.returncode}): "
                f"{proc.stderr[-1500:]}")


def test_compile_probe_reports_a_failed_subprocess():
  with pytest.raises(pytest.fail.Exception, match="no_such_field"):
    _compiles_in_a_subprocess("no_such_field=1")


@pytest.mark.gpu
class TestLifTritonBwdReplayMergeGpu(TestLifTritonBwdReplayGpu):
  """Without prefetch: with it the compile segfaulted (refused); this one is untried, so its
  compile is first tried in a subprocess, where a crash fails the class, not the run."""
  CONFIG = dataclasses.replace(TestLifTritonBwdReplayGpu.CONFIG, fixup_merge=True,
                               bwd_replay_prefetch=False)

  @pytest.fixture(autouse=True, scope="class")
  def _compiles(self):
    _compiles_in_a_subprocess("fixup_merge=True, bwd_replay_prefetch=False")

  def test_large_replay(self):
    _check_large(dataclasses.replace(LifConfig.for_device("NVIDIA H200"), fixup_merge=True,
                                     bwd_replay_prefetch=False))


@pytest.mark.gpu
class TestLifTritonBwdReplayNoPrefetchGpu(TestLifTritonBwdReplayGpu):
  CONFIG = dataclasses.replace(TestLifTritonBwdReplayGpu.CONFIG, bwd_replay_prefetch=False)

  def test_large_replay(self):
    _check_large(dataclasses.replace(LifConfig.for_device("NVIDIA H200"),
                                     bwd_replay_segment=512, bwd_replay=128,
                                     bwd_replay_prefetch=False))


@pytest.mark.gpu
class TestLifTritonFwdSegmentsGpu(TestLifTritonGpu):
  CONFIG = dataclasses.replace(GPU_SMALL, segment=16, segment_replay=8, segment_chunk=8)
  test_large = None

  def test_large_segments(self):
    _check_large(dataclasses.replace(LifConfig.for_device("NVIDIA H200"), segment=256),
                 spikes=True)


@pytest.mark.gpu
class TestLifTritonFwdSegmentsMergeGpu(TestLifTritonFwdSegmentsGpu):
  CONFIG = dataclasses.replace(TestLifTritonFwdSegmentsGpu.CONFIG, fixup_merge=True)

  def test_large_segments(self):
    # the chained backward: the replay's merge walk is refused with its prefetch on
    _check_large(dataclasses.replace(LifConfig.for_device("NVIDIA H200"), segment=256,
                                     fixup_merge=True, bwd_replay=0), spikes=True)


def test_reference_surrogates():
  z = jnp.array([-1.0, -0.25, 0.0, 0.25, 1.0])
  np.testing.assert_allclose(reference.surrogate_grad(z, "atan", 2.0), 1 / (1 + (2 * z) ** 2))
  sg = jax.nn.sigmoid(2 * z)
  np.testing.assert_allclose(reference.surrogate_grad(z, "sigmoid", 2.0), 2 * sg * (1 - sg),
                             rtol=1e-6)
  np.testing.assert_allclose(reference.surrogate_grad(z, "triangle", 2.0),
                             [0.0, 0.5, 1.0, 0.5, 0.0])
  # custom_jvp Heaviside: value 1[z >= 0], derivative = surrogate.
  d = jax.vmap(jax.grad(lambda t: reference.spike(t, "atan", 2.0)))(z)
  np.testing.assert_allclose(d, 1 / (1 + (2 * z) ** 2), rtol=1e-6)


def test_reference_matches_loop():
  x, v0, _, _ = _inputs(1, 12, 5, jnp.float32)
  s, v = reference.lif(x, v0, reset="hard")
  xn, vn = np.asarray(x, np.float64), np.asarray(v0, np.float64).copy()
  for t in range(12):
    w = np.clip(0.95 * vn + xn[:, t], -3, 3)
    st = (w >= 1.0).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(s[:, t]), st)
    vn = w * (1 - st)
  np.testing.assert_allclose(v, vn, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  x = jnp.zeros((1, 3, 4))
  with pytest.raises(ValueError, match="reset"):
    lif(x, reset="soft")
  with pytest.raises(ValueError, match="surrogate"):
    lif(x, surrogate="relu")
  with pytest.raises(ValueError, match="unknown implementation"):
    lif(x, implementation="cuda")


# ---------------------------------------------------------------- Mosaic GPU forward
# Shapes the Mosaic GPU kernels take (T a multiple of mgpu_time_chunk, C of mgpu_block_c):
# 2-3 time tiles of 4 checkpoint segments, 1-2 channel blocks.
MGPU_SMALL = dataclasses.replace(SMALL, mgpu_block_c=128, mgpu_time_chunk=8, mgpu_stages=2)


class LifMosaicGpuBase:
  INTERPRET = None
  CONFIG = MGPU_SMALL

  def lif(self, x, v0=None, **kw):
    return lif(x, v0, implementation="pallas_mosaic_gpu", interpret=self.INTERPRET,
               config=self.CONFIG, **kw)

  @pytest.mark.parametrize("B,T,C,dtype,reset", [
      (1, 8, 128, jnp.float32, "hard"),
      (2, 24, 256, jnp.float32, "subtract"),
      (1, 16, 128, jnp.bfloat16, "hard"),
  ])
  def test_forward(self, B, T, C, dtype, reset):
    x, v0, _, _ = _inputs(B, T, C, dtype)
    s, v_last = jax.jit(functools.partial(self.lif, reset=reset))(x, v0)
    s_ref, v_ref = _ref(x, v0, reset=reset)
    assert s.dtype == x.dtype and v_last.shape == (B, C)
    assert 0.02 < float(jnp.mean(s_ref.astype(jnp.float32))) < 0.5
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    op_testing.assert_close(v_last, v_ref, jnp.float32, name="v_last")

  @pytest.mark.parametrize("surrogate,reset,detach,dtype", [
      ("atan", "hard", True, jnp.float32), ("sigmoid", "subtract", False, jnp.float32),
      ("triangle", "hard", False, jnp.bfloat16)])
  def test_grads(self, surrogate, reset, detach, dtype):
    x, v0, g, gv = _inputs(2, 16, 128, dtype, seed=1)
    kw = dict(surrogate=surrogate, reset=reset, detach_reset=detach)
    got = jax.jit(lambda *a: _grads(functools.partial(self.lif, **kw), *a))(x, v0, g, gv)
    want = _grads(functools.partial(_ref, **kw), x, v0, g, gv)
    for name, a, b, primal in zip(("dx", "dv0"), got, want, (x, v0)):
      assert a.dtype == primal.dtype, name
      op_testing.assert_close(a, b, dtype, grad=True, name=name)

  def test_chunked_equals_unchunked(self):
    x, v0, _, _ = _inputs(1, 32, 128, jnp.float32)
    s, v_last = self.lif(x, v0)
    s1, v1 = self.lif(x[:, :16], v0)
    s2, v2 = self.lif(x[:, 16:], v1)
    np.testing.assert_array_equal(s, jnp.concatenate([s1, s2], 1))
    np.testing.assert_allclose(v_last, v2, rtol=1e-6, atol=1e-6)

  def test_other_shapes_fall_through(self):
    x, v0, _, _ = _inputs(1, 12, 128, jnp.float32)
    with pytest.raises(NotImplementedError, match="T % 8 == 0"):
      self.lif(x, v0)
    with pytest.raises(NotImplementedError, match="mgpu_block_c 64: a multiple of 128"):
      lif(x[:, :8], v0, implementation="pallas_mosaic_gpu", interpret=self.INTERPRET,
          config=dataclasses.replace(self.CONFIG, mgpu_block_c=64))
    x64, _, _, _ = _inputs(1, 64, 128, jnp.float32)
    with pytest.raises(NotImplementedError, match="exceed the 230400 bytes of shared memory"):
      lif(x64, v0, implementation="pallas_mosaic_gpu", interpret=self.INTERPRET,
          config=dataclasses.replace(self.CONFIG, mgpu_time_chunk=64, mgpu_stages=8))
    s, _ = lif(x, v0, implementation=("pallas_mosaic_gpu", "xla"), interpret=self.INTERPRET,
               config=self.CONFIG)
    np.testing.assert_array_equal(s, _ref(x, v0)[0])


@pytest.mark.skipif("pallas_mosaic_gpu" not in implementations(), reason="no jax Mosaic GPU")
class TestLifMosaicGpuInterpret(LifMosaicGpuBase):
  INTERPRET = True


@pytest.mark.gpu
class TestLifMosaicGpuGpu(LifMosaicGpuBase):
  INTERPRET = False
  CONFIG = dataclasses.replace(GPU_SMALL, mgpu_block_c=128, mgpu_time_chunk=8, mgpu_stages=2)


@pytest.mark.gpu
def test_mosaic_gpu_default_tiles_gpu():
  """The H100/H200 defaults (32-step tiles, as many stages as fit) at T a multiple of 32."""
  lif_mgpu = functools.partial(lif, implementation="pallas_mosaic_gpu", interpret=False,
                               config=LifConfig.for_device("NVIDIA H200"))
  x, v0, g, gv = _inputs(2, 96, 256, jnp.float32, seed=2)
  s, v_last = jax.jit(lif_mgpu)(x, v0)
  s_ref, v_ref = _ref(x, v0)
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
  op_testing.assert_close(v_last, v_ref, jnp.float32, name="v_last")
  got = jax.jit(lambda *a: _grads(lif_mgpu, *a))(x, v0, g, gv)
  want = _grads(_ref, x, v0, g, gv)
  for name, a, b in zip(("dx", "dv0"), got, want):
    op_testing.assert_close(a, b, jnp.float32, grad=True, name=name)


def test_mosaic_gpu_forward_lowers_for_the_gpu():
  """Default H200 tiles pass Mosaic GPU's layout inference and shared-memory check on this
  host (interpret mode checks neither: 64-step tiles on 4 stages overflowed shared memory
  only on the GPU, session 10). The backward's lowering takes minutes under jax 0.10.2's
  layout inference: the GPU tests cover it."""
  pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
  x = jax.ShapeDtypeStruct((1, 256, 256), jnp.float32)
  cfg = LifConfig.for_device("NVIDIA H200")
  op_testing.lower_for_gpu(
      lambda x: lif(x, implementation="pallas_mosaic_gpu", config=cfg)[0], x)


def test_bwd_replay_fix_up_walk_stops_where_it_meets_the_earlier_walk():
  """A fix-up walk stops at the first chunk whose outgoing carry equals the one its earlier
  walk stored there: rows below it are left as they were. Poisoned here to see that they are
  not rewritten; the top rows are, and equal the reference."""
  from ops.lif import pallas_triton as pt
  from ops.lif import pallas_triton_bwd_replay as br
  p = dict(beta=0.95, threshold=1.0, v_min=-3.0, v_max=3.0, reset="hard", surrogate="atan",
           alpha=2.0, detach_reset=True)
  # no replay: segment 1 starts from a zero guess, wrong wherever segment 2 hands over a carry
  cfg = dataclasses.replace(SMALL, bwd_replay_segment=32, bwd_replay=0, bwd_replay_block_c=32,
                            fixup_merge=True)
  k = jax.random.split(jax.random.key(11), 3)
  x = 3.0 * jax.random.normal(k[0], (1, 96, 32), jnp.float32)   # spikes / clamps: forgets fast
  g = jax.random.normal(k[1], (1, 96, 32), jnp.float32)
  gv = jax.random.normal(k[2], (1, 32), jnp.float32)
  v0 = jnp.zeros((1, 32), jnp.float32)
  cp = pt._compiler_params(1, 1)

  @jax.jit
  def passes(x, g, gv):
    _, _, ckpt = pt._forward(x, v0, p, True, True, dataclasses.replace(cfg, bwd_replay=0))
    dx, out, used, carries = br.first_pass(x, ckpt, g, gv, p, True, cfg, cp)
    poisoned = dx.at[:, 32:64].set(jnp.nan)
    return dx, br.fix_up_pass(x, ckpt, g, gv, (poisoned, out, used, carries), p, True, cfg,
                              cp)[0]

  first, fixed = passes(x, g, gv)
  want = _grads(_ref, x, v0, g, gv)[0]
  assert float(jnp.max(jnp.abs(first[:, 62:64] - want[:, 62:64]))) > 1e-3   # needed the fix
  op_testing.assert_close(fixed[:, 60:64], want[:, 60:64], jnp.float32, grad=True)
  assert bool(jnp.all(jnp.isnan(fixed[:, 32:48]))), "the walk did not stop early"
  assert bool(jnp.all(jnp.isfinite(fixed[:, 64:]))) and bool(jnp.all(jnp.isfinite(fixed[:, :32])))
