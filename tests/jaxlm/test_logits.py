"""The output-head matmul (jaxlm/layers/logits.py): float32 logits, compute-dtype backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.layers.logits import logits_einsum
from tests.jaxlm.jaxpr_walk import all_eqns

SPEC = "bsd,dv->bsv"


def _inputs(dtype):
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 5, 32), jnp.float32).astype(dtype)
  w = (0.2 * jax.random.normal(kw, (32, 48), jnp.float32)).astype(dtype)
  tgt = jax.random.randint(kt, (2, 5), 0, 48)
  return x, w, tgt


def _loss(einsum, x, w, tgt):
  logits = einsum(x, w)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))


def _plain(x, w):
  return jnp.einsum(SPEC, x, w, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_forward_is_the_float32_einsum_and_grads_match(dtype, tol):
  x, w, tgt = _inputs(dtype)
  ours = lambda x, w: logits_einsum(SPEC, x, w)
  np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(_plain(x, w)))
  assert ours(x, w).dtype == jnp.float32
  g_ours = jax.grad(lambda x, w: _loss(ours, x, w, tgt), argnums=(0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: _loss(_plain, x.astype(jnp.float32), w.astype(jnp.float32),
                                      tgt), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_backward_matmuls_run_in_the_compute_dtype():
  """Both gradient matmuls take bf16 operands (autodiff of the f32-output einsum would feed
  them the float32 cotangent)."""
  x, w, tgt = _inputs(jnp.bfloat16)
  jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: _loss(
      lambda x, w: logits_einsum(SPEC, x, w), x, w, tgt), argnums=(0, 1)))(x, w)

  found = [e for e, _ in all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(found) >= 3, found        # forward (also inside the custom_vjp's params), dx, dW
  for eqn in found:
    assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
