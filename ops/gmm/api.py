"""Public grouped matmul API: `gmm` (ragged lhs rows x per-group rhs) and `tgmm` (its
transposed form, the per-group weight gradient). Both have a custom_vjp whose backward
is again gmm / tgmm, so every implementation's kernels serve the backward too.

Implementations register below inside ``try/except ImportError``; see ops/_backend.py for
the dispatch rules (None = platform default order ending in "xla", a name, or a sequence).
Each implementation is called as
  gmm:  fn(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config)
  tgmm: fn(lhs, rhs, group_sizes, *, out_dtype, interpret, config)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ops import _backend
from ops._backend import CPU, GPU, TPU, UnsupportedError
from ops.gmm import reference
from ops.gmm.config import GmmBlockConfig

# GPU: the Mosaic GPU kernel first (H200, back-to-back timing, session 9: 1.14-1.15x the
# Triton kernel fwd and 1.07-1.10x fwd+bwd on the three bench shapes); it refuses f32, m not
# a multiple of 8 and k / n not multiples of its tiles, which then go to Triton.
_GMM = _backend.Op("gmm", {
    GPU: ("pallas_mosaic_gpu", "pallas_triton", "ragged_dot", "xla"),
    TPU: ("pallas_tpu", "ragged_dot", "xla"),
    CPU: ("ragged_dot", "xla"),
})
_TGMM = _backend.Op("tgmm", {
    GPU: ("pallas_triton", "ragged_dot", "xla"),
    TPU: ("pallas_tpu", "ragged_dot", "xla"),
    CPU: ("ragged_dot", "xla"),
})


def _highest_if_f32(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ---------------------------------------------------------------- xla (reference)
def _xla_gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config):
  del interpret, config
  return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype,
                       precision=_highest_if_f32(lhs.dtype), transpose_rhs=transpose_rhs)


def _xla_tgmm(lhs, rhs, group_sizes, *, out_dtype, interpret, config):
  del interpret, config
  return reference.tgmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype,
                        precision=_highest_if_f32(lhs.dtype))


# ---------------------------------------------------------------- lax.ragged_dot
def _ragged_dot_gmm(lhs, rhs, group_sizes, *, out_dtype, transpose_rhs, interpret, config):
  del interpret, config
  if not hasattr(lax, "ragged_dot_general"):
    raise UnsupportedError("this jax has no lax.ragged_dot_general")
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [2] if transpose_rhs else [1]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
  out = lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _ragged_dot_tgmm(lhs, rhs, group_sizes, *, out_dtype, interpret, config):
  del interpret, config
  if not hasattr(lax, "ragged_dot_general"):
    raise UnsupportedError("this jax has no lax.ragged_dot_general")
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = lax.ragged_dot_general(lhs, rhs, group_sizes, dims, preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


_GMM.register("xla", _xla_gmm)
_TGMM.register("xla", _xla_tgmm)
_GMM.register("ragged_dot", _ragged_dot_gmm)
_TGMM.register("ragged_dot", _ragged_dot_tgmm)

try:
  from ops.gmm import pallas_triton as _pallas_triton
  _GMM.register("pallas_triton", _pallas_triton.gmm, platforms=(GPU,))
  _TGMM.register("pallas_triton", _pallas_triton.tgmm, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.gmm import pallas_mosaic_gpu as _pallas_mosaic_gpu
  _GMM.register("pallas_mosaic_gpu", _pallas_mosaic_gpu.gmm, platforms=(GPU,))
  # tgmm: first in the GPU default order only for large groups (_tgmm_order)
  _TGMM.register("pallas_mosaic_gpu", _pallas_mosaic_gpu.tgmm, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.gmm import pallas_tpu as _pallas_tpu
  _GMM.register("pallas_tpu", _pallas_tpu.gmm, platforms=(TPU,))
  _TGMM.register("pallas_tpu", _pallas_tpu.tgmm, platforms=(TPU,))
except ImportError:
  pass


def implementations() -> tuple[str, ...]:
  """Names registered for `gmm` (and `tgmm`)."""
  return _GMM.names


def _canon_impl(implementation):
  if implementation is None or isinstance(implementation, str):
    return implementation
  return tuple(implementation)


def _default_config(config):
  if config is not None:
    if not isinstance(config, GmmBlockConfig):
      raise TypeError(f"config must be a GmmBlockConfig, got {type(config).__name__}")
    return config
  return GmmBlockConfig.for_device(_backend.device_kind(), _backend.platform())


# ---------------------------------------------------------------- custom_vjp cores
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_core(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config):
  return _GMM(implementation, lhs, rhs, group_sizes, out_dtype=out_dtype, transpose_rhs=False,
              interpret=interpret, config=config)


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config):
  out = _gmm_core(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, implementation, interpret, config, res, dout):
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = _GMM(implementation, dout, rhs, group_sizes, out_dtype=lhs.dtype, transpose_rhs=True,
              interpret=interpret, config=config)
  drhs = _TGMM(_tgmm_order(_tgmm_implementation(implementation), lhs.shape[0],
                           group_sizes.shape[0]),
               lhs, dout, group_sizes, out_dtype=rhs.dtype, interpret=interpret, config=config)
  return dlhs, drhs, None


_gmm_core.defvjp(_gmm_fwd, _gmm_bwd)


def _tgmm_implementation(implementation):
  """gmm implementations without a tgmm kernel leave d rhs to the platform's default tgmm
  list; names tgmm has are kept, in order."""
  if implementation is None:
    return None
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  kept = tuple(n for n in names if n in _TGMM.names)
  return kept or None


# The Mosaic GPU tgmm walks each group in 64-row chunks and zeroes the rows of its first and
# last chunk outside the group, which costs most on small groups. H200, session 11, bf16,
# k=2048: it took 0.86x the Triton tgmm's time at 2048 rows per group (e8, n=5632), 0.97x at
# 512 balanced and 1.18x at 512 imbalanced (e64, n=1408).
_MOSAIC_TGMM_MIN_ROWS_PER_GROUP = 1024


def _tgmm_order(implementation, m, num_groups):
  """The default tgmm order, with the Mosaic GPU kernel first on GPUs when groups average at
  least _MOSAIC_TGMM_MIN_ROWS_PER_GROUP rows; explicit choices are kept."""
  if (implementation is None and _backend.platform() == GPU
      and "pallas_mosaic_gpu" in _TGMM.names
      and m >= _MOSAIC_TGMM_MIN_ROWS_PER_GROUP * max(num_groups, 1)):
    return ("pallas_mosaic_gpu",) + _TGMM.candidates(None)
  return implementation


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _tgmm_core(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config):
  return _TGMM(implementation, lhs, rhs, group_sizes, out_dtype=out_dtype,
               interpret=interpret, config=config)


def _tgmm_fwd(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config):
  out = _tgmm_core(lhs, rhs, group_sizes, out_dtype, implementation, interpret, config)
  return out, (lhs, rhs, group_sizes)


def _tgmm_bwd(out_dtype, implementation, interpret, config, res, dout):
  # out[g] = lhs_g^T rhs_g  =>  d lhs_g = rhs_g dout[g]^T,  d rhs_g = lhs_g dout[g].
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = _GMM(implementation, rhs, dout, group_sizes, out_dtype=lhs.dtype, transpose_rhs=True,
              interpret=interpret, config=config)
  drhs = _GMM(implementation, lhs, dout, group_sizes, out_dtype=rhs.dtype, transpose_rhs=False,
              interpret=interpret, config=config)
  return dlhs, drhs, None


_tgmm_core.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check_group_sizes(group_sizes, num_groups=None):
  if group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be 1-D [num_groups], got shape {group_sizes.shape}")
  if num_groups is not None and group_sizes.shape[0] != num_groups:
    raise ValueError(f"group_sizes has {group_sizes.shape[0]} groups, rhs has {num_groups}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(f"group_sizes must be integer, got {group_sizes.dtype}")
  return group_sizes.astype(jnp.int32)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, implementation=None,
        interpret: bool | None = None, config: GmmBlockConfig | None = None):
  """Grouped matmul: out[rows of g] = lhs[rows of g] @ rhs[g].

  lhs: [m, k] with rows sorted by group (group g owns the next group_sizes[g] rows);
  rhs: [num_groups, k, n]; group_sizes: [num_groups] int with sum <= m (rows past the sum
  produce zeros). Returns [m, n] in preferred_element_type (default lhs.dtype), accumulated
  in f32. custom_vjp: d lhs = gmm(dout, rhs transposed), d rhs = tgmm(lhs, dout).
  """
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(f"gmm expects lhs [m, k] and rhs [g, k, n]; got {lhs.shape}, {rhs.shape}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"contraction mismatch: lhs {lhs.shape} vs rhs {rhs.shape}")
  group_sizes = _check_group_sizes(group_sizes, rhs.shape[0])
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  return _gmm_core(lhs.astype(dtype), rhs.astype(dtype), group_sizes, out_dtype,
                   _canon_impl(implementation), interpret, _default_config(config))


def tgmm(lhs, rhs, group_sizes, *, preferred_element_type=None, implementation=None,
         interpret: bool | None = None, config: GmmBlockConfig | None = None):
  """Transposed grouped matmul: out[g] = lhs[rows of g].T @ rhs[rows of g].

  lhs: [m, k], rhs: [m, n], both with rows sorted by group; group_sizes [num_groups] int,
  sum <= m (later rows are ignored). Returns [num_groups, k, n] in preferred_element_type
  (default lhs.dtype), zero for empty groups.
  """
  if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
    raise ValueError(f"tgmm expects lhs [m, k] and rhs [m, n]; got {lhs.shape}, {rhs.shape}")
  group_sizes = _check_group_sizes(group_sizes)
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  return _tgmm_core(lhs.astype(dtype), rhs.astype(dtype), group_sizes, out_dtype,
                    _tgmm_order(_canon_impl(implementation), lhs.shape[0],
                                group_sizes.shape[0]),
                    interpret, _default_config(config))
