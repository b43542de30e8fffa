"""Helpers shared by the NSA Mosaic TPU kernels (ops/nsa/tpu_selected.py, tpu_scores.py).

Compiler params across jax versions, the matmul precision per dtype, the two MXU contractions
the kernels use (a @ b.T and a @ b, accumulated in f32) and end-padding of one axis.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from ops.nsa.kernel_common import pad_axis as _pad_axis  # noqa: F401  (re-exported)
from ops.nsa.kernel_common import prec as _prec  # noqa: F401  (re-exported)

_F32 = jnp.float32
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _dims(*sem):
  return _CompilerParams(dimension_semantics=sem)


def _nt(a, b, prec):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)


def _nn(a, b, prec):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)
