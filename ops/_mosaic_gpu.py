"""Helpers shared by the Pallas Mosaic GPU kernels of every op."""
from __future__ import annotations

from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params(zero_fill_oob: bool = False):
  """Mosaic GPU interpret mode (CPU). zero_fill_oob: out-of-bounds reads return zeros, as TMA
  loads do on the GPU (kernels that rely on it); otherwise they raise, which catches bugs."""
  cls = getattr(plgpu, "InterpretParams", None)
  if cls is None:       # jax <= 0.10: only under its private name
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
  if zero_fill_oob:
    return cls(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")
  return cls()


def warpgroup_kernel(body, out_type, *, grid, grid_names, interpret: bool,
                     zero_fill_oob: bool = False, **kwargs):
  """plgpu.kernel with warpgroup lowering semantics (array ops are per warpgroup), compiled
  for the GPU or run in interpret mode; kwargs: num_threads / thread_name and the like."""
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=grid_names,
      interpret=interpret_params(zero_fill_oob) if interpret else False,
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **kwargs)


def require_hopper(interpret: bool) -> None:
  """UnsupportedError (dispatch moves on) unless the kernels can compile here: they use wgmma
  and TMA as Hopper (compute capability 9.x) has them; Ampere lacks both and Blackwell's
  tensor cores take other instructions. Interpret mode runs anywhere. Without a local GPU
  (lowering for a target device kind on a CPU host) the device kind decides."""
  if interpret:
    return
  import jax
  from ops._backend import UnsupportedError, device_kind
  cc = str(getattr(jax.local_devices()[0], "compute_capability", "") or "")
  if cc and not cc.startswith("9."):
    raise UnsupportedError(f"Mosaic GPU kernels here need Hopper (sm_90); this GPU is sm_{cc}")
  if not cc and not any(s in device_kind().lower() for s in ("h100", "h200", "h800", "gh200")):
    raise UnsupportedError(f"Mosaic GPU kernels here need Hopper; device kind {device_kind()!r}")


def load_rows(pairs) -> None:
  """TMA-copies each (gmem ref, smem ref) pair and waits for all: small per-CTA vectors such
  as an initial state. One barrier, one arrival per copy."""
  import functools
  from jax.experimental import pallas as pl

  @functools.partial(pl.run_scoped, bar=plgpu.Barrier(num_arrivals=len(pairs)))
  def _(bar):
    for src, dst in pairs:
      plgpu.copy_gmem_to_smem(src, dst, bar)
    plgpu.barrier_wait(bar)


def store_rows(pairs) -> None:
  """Writes each (value, smem ref, gmem ref) through shared memory to global memory by TMA and
  waits until the stores are done (a kernel's last outputs)."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)    # earlier stores may still read smem
  for value, smem, _ in pairs:
    smem[...] = value
  plgpu.commit_smem()
  for _, smem, dst in pairs:
    plgpu.copy_smem_to_gmem(smem, dst)
  plgpu.wait_smem_to_gmem(0)


# Shared memory one block may take on Hopper (227 KiB; jax 0.11.2 reports 232448 bytes), less
# room for the pipeline's barriers and small scratch.
SMEM_BYTES = 225 * 1024


def fit_stages(requested: int, stage_bytes: int, fixed_bytes: int, what: str,
               max_stages: int = 8) -> int:
  """Pipeline depth that fits Hopper's shared memory: `requested` if > 0, else as many stages
  of `stage_bytes` as fit beside `fixed_bytes` (2..max_stages). Interpret mode has no limit,
  so a config that would not compile is refused here, for both, with the bytes it needs."""
  from ops._backend import UnsupportedError
  fit = (SMEM_BYTES - fixed_bytes) // stage_bytes
  stages = requested if requested > 0 else min(max_stages, fit)
  if stages < 2 or stages > fit:
    raise UnsupportedError(
        f"{what}: {max(stages, 2)} pipeline stages of {stage_bytes} bytes + {fixed_bytes} "
        f"bytes of buffers exceed the {SMEM_BYTES} bytes of shared memory; use smaller tiles")
  return stages
