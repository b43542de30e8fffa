"""Small helpers shared by the NSA Pallas kernels (Triton: pallas_triton, decode_triton,
topn_triton; Mosaic TPU: tpu_common): power-of-two tile sizes, the matmul precision per dtype,
f32-accumulating contractions, end-padding of one axis, Triton launch parameters."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def pow2(x: int, lo: int = 16) -> int:
  """Smallest power of two >= x, at least lo."""
  return max(lo, 1 << max(0, int(x) - 1).bit_length())


def prec(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def dot(a, b, precision, ta=False, tb=False):
  """a @ b with optional transposes, f32 accumulation."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def dot_f32_bf16_exact(a, b_bf16):
  """a [m,k] f32 @ b [k,n] on bf16 tensor cores at f32 accuracy, for a b whose every value is
  exact in bf16 (callers check): a is split into three bf16 parts (8 significand bits each,
  24 in all, as many as f32 holds), each part times b is exact in f32, and the three products
  accumulate in f32. Precision.HIGHEST would lower to scalar FMAs on the GPU."""
  hi = a.astype(jnp.bfloat16)
  r = a - hi.astype(F32)
  mid = r.astype(jnp.bfloat16)
  lo = (r - mid.astype(F32)).astype(jnp.bfloat16)
  d = lax.Precision.DEFAULT
  return dot(hi, b_bf16, d) + dot(mid, b_bf16, d) + dot(lo, b_bf16, d)


def dot_nt(a, b, precision):
  """a [m,k] @ b [n,k]^T, f32 accumulation."""
  return dot(a, b, precision, tb=True)


def iota(n):
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def pad_axis(x, axis, size, value=0):
  """Pads `axis` at the end up to `size` (unchanged when already that long or longer)."""
  if x.shape[axis] >= size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def online_softmax_step(s, v, carry, precision):
  """One flash-attention step: s [rows, n] masked logits (-inf = excluded), v [n, dv];
  carry (running max m [rows], normaliser l [rows], acc [rows, dv]) in f32."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.exp(s - m_safe[:, None])
  l = l * alpha + jnp.sum(p, axis=1)
  acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision)
  return m_new, l, acc


def triton_compiler(interpret, warps, stages):
  """pallas_call kwargs with the Triton launch parameters (none in interpret mode)."""
  if interpret:
    return {}
  from jax.experimental.pallas import triton as plgpu
  return dict(compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))
