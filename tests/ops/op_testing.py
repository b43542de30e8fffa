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


def rel_err(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.all(np.isfinite(out)), "non-finite values in output"
  denom = np.linalg.norm(ref.ravel())
  return float(np.linalg.norm((out - ref).ravel()) / max(denom, 1e-30))


def assert_close(out, ref, dtype, *, grad=False, tol=None, name="output"):
  tol = tol if tol is not None else TOL[jnp.dtype(dtype).type] * (GRAD_FACTOR if grad else 1.0)
  err = rel_err(out, ref)
  assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
