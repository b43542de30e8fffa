"""jaxlm.aot for NVIDIA GPUs on a host without one (jaxlm/gpu_targets.py).

The first group runs everywhere: topology names, the target config text, usable memory. The
`gpu_aot` group compiles through the CUDA PJRT plugin (the [gpu] extra) for an H100 / H200
that is not attached; it is skipped where the plugin is not installed (CI installs [dev,tpu]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxlm import aot, configs, gpu_targets
from jaxlm.config import apply_overrides

# ----------------------------------------------------------------------------- no plugin


@pytest.mark.parametrize("name,hosts,n", [("h100", 1, 1), ("h200:2", 1, 2), ("H100:8", 1, 8),
                                          ("h200:2x8", 2, 8)])
def test_parse_gpu_topology(name, hosts, n):
  spec, h, g = gpu_targets.parse(name)
  assert (h, g) == (hosts, n)
  assert spec.device_kind.startswith("NVIDIA H")
  assert gpu_targets.is_gpu_topology(name)


@pytest.mark.parametrize("name", ["h300", "h100:", "h100:0", "h100:2x", "h100:x2", "h200:2x0"])
def test_bad_gpu_topology_is_named(name):
  with pytest.raises(ValueError, match="GPU topology"):
    gpu_targets.parse(name)


def test_tpu_names_are_not_gpu_topologies():
  assert not gpu_targets.is_gpu_topology("v5e:2x2")
  assert not gpu_targets.is_gpu_topology("v5p:4x4x4")


def test_target_config_text():
  text = gpu_targets.target_config(gpu_targets.SPECS["h200"])
  assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert 'device_description_str: "NVIDIA H200"' in text
  assert f"device_memory_size: {143771 * 1024 ** 2}" in text


def test_usable_memory_follows_the_allocator_settings(monkeypatch):
  card = gpu_targets.SPECS["h100"].memory_bytes
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  assert aot.hbm_bytes("NVIDIA H100 80GB HBM3") == int(card * 0.75)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert aot.hbm_bytes("NVIDIA H100 80GB HBM3") == int(card * 0.9)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  assert aot.hbm_bytes("NVIDIA H100 80GB HBM3") == card
  assert aot.hbm_bytes("TPU v5 lite") == 16 * aot.GiB   # TPU table unchanged


def test_gpu_topology_without_plugin_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(aot, "has_gpu_compiler", lambda: False)
  aot.topology_devices.cache_clear()
  with pytest.raises(aot.AotUnavailable, match=r"\[gpu\]"):
    aot.topology_devices("h100")
  aot.topology_devices.cache_clear()


# ----------------------------------------------------------------------------- CUDA plugin

SMALL_STEP = ("model.n_layers=2", "train.batch_size=8")


@pytest.mark.gpu_aot
def test_tiny_train_step_compiles_h100():
  cfg = apply_overrides(configs.get_preset("tiny_cpu"), list(SMALL_STEP))
  r = aot.compile_train_step(cfg, aot.topology_devices("h100"), "h100")
  assert r.device_kind == "NVIDIA H100 80GB HBM3" and r.n_devices == 1
  assert r.hbm_bytes == gpu_targets.usable_memory_bytes(r.device_kind)
  assert r.fits is True and r.peak_bytes > r.state_bytes > 0


@pytest.mark.gpu_aot
def test_data_parallel_train_step_on_two_h200():
  cfg = apply_overrides(configs.get_preset("tiny_cpu"), ["mesh.data=2", *SMALL_STEP])
  r = aot.compile_train_step(cfg, aot.topology_devices("h200:2"), "h200:2")
  assert r.n_devices == 2 and r.mesh["data"] == 2
  assert r.collectives["all-reduce"] >= 1   # the gradient


@pytest.mark.gpu_aot
@pytest.mark.parametrize("impl,target", [("pallas_mosaic_gpu", "mosaic_gpu"),
                                         ("pallas_triton", "triton")])
def test_pallas_gmm_compiles_for_h200(impl, target):
  """Pallas GPU kernels lower for the target GPU (compiled, not interpreted)."""
  import ops.gmm
  x = jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16)
  gs = jax.ShapeDtypeStruct((8,), jnp.int32)
  compiled = aot.compile_single_device(
      lambda a, b, g: ops.gmm.gmm(a, b, g, implementation=impl), [x, w, gs],
      aot.topology_devices("h200")[0])
  assert target in compiled.as_text()


@pytest.mark.gpu_aot
def test_fsdp_train_step_on_two_hosts_of_h100():
  """A topology of 2 hosts x 4 GPUs: params and optimizer state sharded over all 8."""
  cfg = apply_overrides(configs.get_preset("tiny_cpu"),
                        ["mesh.data=1", "mesh.fsdp=8", *SMALL_STEP])
  r = aot.compile_train_step(cfg, aot.topology_devices("h100:2x4"), "h100:2x4")
  assert r.n_devices == 8 and r.mesh["fsdp"] == 8
  assert r.collectives["all-gather"] >= 1 and r.fits is True


@pytest.mark.gpu_aot
@pytest.mark.parametrize("preset,mesh,unroll", [
    ("tiny_cpu", "mesh.data=2", "false"), ("tiny_cpu", "mesh.tensor=2", "true"),
    ("tiny_nsa_cpu", "mesh.data=2", "true"), ("tiny_symboliclight_cpu", "mesh.data=2", "true")])
def test_decode_step_on_two_h200(preset, mesh, unroll):
  """The decode step compiles for 2 GPUs. Writing the new token into the layer-stacked cache
  as a vmapped dynamic_update_slice failed XLA's GPU compile on any multi-device mesh
  (batched_gather_scatter_normalizer: repeated scatter_dims_to_operand_dims)."""
  cfg = apply_overrides(configs.get_preset(preset),
                        [mesh, "model.n_layers=2", "model.decode_unroll=" + unroll])
  r = aot.compile_decode_step(cfg, aot.topology_devices("h200:2"), "h200:2", batch=8,
                              cache_len=256)
  assert r.n_devices == 2 and r.fits is True
