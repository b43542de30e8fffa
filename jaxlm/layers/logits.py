"""The output-head matmul: logits in float32 from compute-dtype (bf16) operands, with a backward
that keeps the two gradient matmuls in the compute dtype.

Left to autodiff, the float32 logits' cotangent stays float32 and both backward matmuls of the
head (dx: [tokens, vocab] @ [vocab, d], dW: [d, tokens] @ [tokens, vocab]) run as f32/tf32
GEMMs: 13.7 ms of a 322 ms nsa_1b step (4x4096, H200), the largest matmuls of the model at
vocab 32768. The cotangent (softmax - onehot, in [-1, 1]) is rounded to the compute dtype, as
every other layer's cotangent already is.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def logits_einsum(spec: str, x, w):
  """jnp.einsum(spec, x, w) with float32 output. x, w: same (compute) dtype, e.g.
  x [batch, seq, d] and w [d, vocab] with spec "bsd,dv->bsv"."""
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _fwd(spec, x, w):
  return logits_einsum(spec, x, w), (x, w)


def _bwd(spec, res, ct):
  x, w = res
  _, vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
  return vjp(ct.astype(jnp.result_type(x, w)))


logits_einsum.defvjp(_fwd, _bwd)
