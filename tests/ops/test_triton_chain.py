"""ops/_triton_chain: the hand-off between programs of a chained Pallas Triton scan."""
import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl

from ops import _backend
from ops import _triton_chain as chain

plgpu = pytest.importorskip("jax.experimental.pallas.triton")
LANES = 32


def _chain_kernel(c_in, b_in, c_ref, b_ref, *, interpret):
  """Program with ticket t waits for slot t and publishes slot t + 1 = slot t + 1.0."""
  del c_in, b_in
  t = chain.take_ticket(c_ref, pl.program_id(0))
  mask = lax.broadcasted_iota(jnp.int32, (LANES,), 0) < LANES - 3    # 3 lanes never written
  v = chain.wait(b_ref, (t, slice(None)), mask, interpret)
  chain.publish(b_ref, (t + 1, slice(None)), v + 1.0, mask, interpret)


def _run_chain(n, interpret, debug=False):
  counter = jnp.zeros((1,), jnp.int32)
  buf = chain.carry_buffer((n + 1, LANES), first=jnp.zeros((LANES,)), at=0)
  one = pl.BlockSpec((1,), lambda i, k: (0,))
  whole = pl.BlockSpec((n + 1, LANES), lambda i, k: (0, 0))
  return pl.pallas_call(
      functools.partial(_chain_kernel, interpret=interpret), grid=(1, n),
      in_specs=[one, whole], out_specs=(one, whole),
      out_shape=(jax.ShapeDtypeStruct((1,), jnp.int32),
                 jax.ShapeDtypeStruct((n + 1, LANES), jnp.int32)),
      input_output_aliases={0: 0, 1: 1}, interpret=interpret, debug=debug,
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1))(counter, buf)


def _check(counter, buf, n):
  assert int(counter[0]) == n
  values = np.asarray(chain.as_float(buf))
  want = np.broadcast_to(np.arange(n + 1.0)[:, None], (n + 1, LANES - 3))
  np.testing.assert_array_equal(values[:, :LANES - 3], want)
  assert (np.asarray(buf)[1:, LANES - 3:] == chain.SENTINEL).all()   # masked lanes untouched


def test_chain_interpret():
  _check(*_run_chain(9, interpret=True), 9)


def test_chain_triton_ir_reads_without_writing():
  """The wait must read with an integer atomic that leaves the word as it is. (Session 11: an
  atomic add of an int32 vector lowered as a float add, which rewrote SENTINEL into a NaN and
  ended every wait at once; interpret mode cannot show it.)"""
  out = io.StringIO()
  with contextlib.redirect_stdout(out), _backend.target("gpu", "NVIDIA H200"):
    jax.jit(lambda: _run_chain(4, interpret=False, debug=True)).trace().lower(
        lowering_platforms=("cuda",))
  ir = out.getvalue()
  assert "tt.atomic_rmw or" in ir and "tt.atomic_rmw exch" in ir
  assert "tt.atomic_rmw add" in ir          # the ticket: a scalar integer add
  assert "fadd" not in ir


def test_publish_never_writes_the_sentinel():
  bits = lax.bitcast_convert_type(chain.SENTINEL, jnp.float32)
  assert np.isnan(np.asarray(bits))          # the sentinel is a NaN pattern ...
  buf = jnp.full((1, LANES), chain.SENTINEL, jnp.int32)

  def kernel(b_in, b_ref):
    del b_in
    chain.publish(b_ref, (jnp.int32(0), slice(None)), jnp.full((LANES,), jnp.nan, jnp.float32),
                  jnp.ones((LANES,), bool), True)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(buf.shape, jnp.int32),
                       input_output_aliases={0: 0}, interpret=True)(buf)
  assert not (np.asarray(out) == chain.SENTINEL).any()   # ... a published NaN is not


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 64, 2048])
def test_chain_gpu(n):
  _check(*_run_chain(n, interpret=False), n)


@pytest.mark.parametrize("forward", [True, False])
def test_lookback_folds_unfinished_segments(forward):
  """Segment 3 of 5 in chain order finds only the chain input and the maps of the segments
  before it (none has published its carry yet): it must fold those maps into the input."""
  n_seg, lanes = 5, LANES
  rng = np.random.default_rng(0)
  maps = rng.uniform(0.5, 1.5, (n_seg, 2, lanes)).astype(np.float32)
  first = rng.normal(size=(1, lanes)).astype(np.float32)
  order = list(range(n_seg)) if forward else list(reversed(range(n_seg)))
  q = order[3]
  state, _, _ = chain.operands(1, lanes, lanes, n_seg, jnp.asarray(first), forward, True)
  _, buf, agg = state
  bits = lambda x: lax.bitcast_convert_type(jnp.asarray(x), jnp.int32)
  for p in order[:3]:
    agg = agg.at[0, p].set(bits(maps[p]))
  m, n = maps[q]

  def kernel(buf_in, agg_in, m_ref, n_ref, out_ref):
    mask = jnp.ones((lanes,), bool)
    out_ref[...] = chain.receive(buf_in, agg_in, jnp.int32(0), jnp.int32(q), m_ref[...],
                                 n_ref[...], mask, True, forward=forward, n_seg=n_seg)
  got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((lanes,), jnp.float32),
                       interpret=True)(buf, agg, jnp.asarray(m), jnp.asarray(n))
  want = first[0].astype(np.float64)
  for p in order[:3]:
    want = maps[p, 0] * want + maps[p, 1]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
