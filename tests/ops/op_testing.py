"""Shared helpers of the per-op test bases: tolerances, comparisons, random inputs."""
import numpy as np
import jax
import jax.numpy as jnp

# Relative error ‖out − ref‖ / ‖ref‖ allowed per dtype (DESIGN.md: f32 1e-5, bf16 1e-2;
# gradients twice that). Triton's f32 dots run in tf32 unless told otherwise, so
# kernels compiled on GPU pass `precision` explicitly or the test uses GPU_F32.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
GRAD_FACTOR = 2.0
GPU_F32 = 1e-3  # tf32 matrix units on GPU


def rel_err(out, ref, scale: float = 0.0) -> float:
  """‖out − ref‖ / max(‖ref‖, scale·√size). `scale` is the per-element magnitude of what the
  result is computed from: a reference that is exactly zero (e.g. the gradient of a softmax
  over one key) is then compared with rounding noise of that magnitude, not with zero."""
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.all(np.isfinite(out)), "non-finite values in output"
  denom = max(np.linalg.norm(ref.ravel()), scale * np.sqrt(ref.size))
  return float(np.linalg.norm((out - ref).ravel()) / max(denom, 1e-30))


def assert_close(out, ref, dtype, *, grad=False, tol=None, name="output", scale=0.0):
  tol = tol if tol is not None else TOL[jnp.dtype(dtype).type] * (GRAD_FACTOR if grad else 1.0)
  err = rel_err(out, ref, scale)
  assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def verified_triton_lowering(fn, *args, device_kind="NVIDIA H100 80GB HBM3"):
  """Lowers jit(fn)(*args) for CUDA on this CPU-only host and runs the MLIR verifier on every
  Triton module the Pallas kernels emit (Triton's own checks, e.g. loop-bound types, that
  otherwise fail only when the GPU compiles the kernel). Returns the number of modules.

  Needs a jaxlib that lowers Pallas Triton without compiling it (<= 0.10.2); newer ones
  compile in-process, which needs the GPU: callers skip there (`triton_lowering_on_cpu`)."""
  return len(triton_module_sizes(fn, *args, device_kind=device_kind))


def triton_module_sizes(fn, *args, device_kind="NVIDIA H100 80GB HBM3"):
  """Lines of MLIR of each verified Triton module that jit(fn)(*args) emits, in lowering order
  (IR size is what Triton's compile time grows with)."""
  import pytest
  from jax._src.pallas.triton import pallas_call_registration as registration
  from ops import _backend
  lower = registration.lowering.lower_jaxpr_to_triton_module
  sizes = []

  def checked(*a, **k):
    result = lower(*a, **k)
    result.module.operation.verify()          # raises MLIRError naming the failing op
    sizes.append(len(str(result.module).splitlines()))
    return result

  mp = pytest.MonkeyPatch()
  mp.setattr(registration.lowering, "lower_jaxpr_to_triton_module", checked)
  try:
    with _backend.target("gpu", device_kind):
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    mp.undo()
  return sizes


def triton_lowering_on_cpu() -> bool:
  """True when this jaxlib lowers Pallas Triton kernels without a GPU (<= 0.10.2)."""
  import re
  import jaxlib
  version = tuple(int(re.match(r"\d+", x).group()) for x in jaxlib.__version__.split(".")[:3])
  return version <= (0, 10, 2) or any(d.platform == "gpu" for d in jax.devices())


def lower_for_gpu(fn, *args, device_kind="NVIDIA H200"):
  """Lowers jit(fn)(*args) for CUDA on this (CPU) host as the `device_kind` GPU would: Pallas
  Mosaic GPU kernels run their layout inference and shared-memory check during lowering, and
  Pallas Triton kernels are translated to Triton IR (code paths interpret mode replaces, such
  as atomics), so kernels that interpret mode accepts but the GPU compiler refuses fail here,
  in CI."""
  from ops import _backend
  with _backend.target("gpu", device_kind):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
