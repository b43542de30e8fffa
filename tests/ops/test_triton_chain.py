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
