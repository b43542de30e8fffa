"""jaxlm.aot: TPU ahead-of-time compile reports.

The first group runs everywhere (8 simulated CPU devices, no libtpu): collective counting,
the compiler's out-of-HBM message, fit advice, the ops target scope, and a report of a sharded
train step compiled for CPU devices. The `tpu_aot` group compiles the tiny presets' sharded
train steps (and a decode step) for a v5e:2x2 slice through libtpu.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm import aot, aot_report, configs
from jaxlm.config import apply_overrides
from ops import _backend

# ----------------------------------------------------------------------------- no libtpu


def test_count_collectives_text():
  hlo = """
  %all-reduce.1 = f32[] all-reduce(f32[] %x), replica_groups={}
  %ag = (f32[4], f32[16]) all-gather-start(f32[4] %y)
  %agd = f32[16] all-gather-done((f32[4], f32[16]) %ag)
  %rs = f32[2] reduce-scatter(f32[8] %z)
  %cp = f32[8] collective-permute-start(f32[8] %z)
  %a2a = f32[8] all-to-all(f32[8] %z)
  %r = f32[8] ragged-all-to-all(f32[8] %z, f32[8] %o, s32[2] %a, s32[2] %b, s32[2] %c, s32[2] %d)
  """
  assert aot.count_collectives(hlo) == {
      "all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 1,
      "collective-permute": 1, "ragged-all-to-all": 1}


def test_count_collectives_compiled_cpu():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
  x = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  compiled = jax.jit(lambda a: jnp.sum(a), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
  assert aot.count_collectives(compiled.as_text())["all-reduce"] >= 1


def test_parse_oom():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (105.03G) exceeds available HBM (95.74G).")
  temp, avail = aot.parse_oom(msg)
  assert temp == int(105.03 * 2**30) and avail == int(95.74 * 2**30)
  assert aot.parse_oom("INTERNAL: something else") is None


def test_hbm_table():
  assert aot.hbm_bytes("TPU v5 lite") == 16 * aot.GiB
  assert aot.hbm_bytes("TPU v5") > 90 * aot.GiB
  assert aot.hbm_bytes("TPU v6 lite") == 32 * aot.GiB
  assert aot.hbm_bytes("cpu") is None


def test_target_is_scoped():
  before = (_backend.platform(), _backend.device_kind())
  with _backend.target("tpu", "TPU v5 lite"):
    assert (_backend.platform(), _backend.device_kind()) == ("tpu", "TPU v5 lite")
    assert _backend.resolve_interpret(None, _backend.TPU) is False
  assert (_backend.platform(), _backend.device_kind()) == before


def _tiny(name="tiny_cpu", *extra):
  return apply_overrides(configs.get_preset(name),
                         ["model.n_layers=2", "train.batch_size=8", "train.seq_len=32", *extra])


def test_train_step_report_cpu():
  cfg = _tiny("tiny_cpu", "mesh.data=2", "mesh.fsdp=4")
  devices = jax.devices()[:8]
  r = aot.compile_train_step(cfg, devices, "cpu:8")
  assert r.mesh == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
  # params + 2 Adam moments in f32, sharded 4 ways over fsdp where "embed" divides.
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      __import__("jaxlm.models.functional", fromlist=["build"]).build(cfg.model).param_shapes))
  assert 3 * 4 * n_params / 4 <= r.state_bytes <= 3 * 4 * n_params
  assert r.argument_bytes >= r.state_bytes
  assert r.hbm_bytes is None and r.fits is None  # no HBM figure for CPU
  assert r.collectives["all-reduce"] + r.collectives["reduce-scatter"] >= 1
  assert r.flops and r.flops > 0
  table = aot_report.format_reports([r])
  assert "train_step" in table and "tiny_cpu" in table


def test_state_bytes_for_mesh_shrinks_with_fsdp():
  cfg = _tiny()
  devices = jax.devices()[:8]
  from jaxlm.config import MeshConfig
  full = aot_report.state_bytes_for_mesh(cfg, devices, MeshConfig(data=8))
  sharded = aot_report.state_bytes_for_mesh(cfg, devices, MeshConfig(data=1, fsdp=8))
  assert sharded < full / 4


def test_fit_advice_suggests_fsdp_when_state_dominates():
  cfg = _tiny("tiny_cpu", "mesh.data=8")
  devices = jax.devices()[:8]
  state = aot_report.state_bytes_for_mesh(cfg, devices, cfg.mesh)
  # A chip whose HBM holds a fraction of the replicated state, but a sharded copy easily.
  r = aot.Report(what="train_step", config=cfg.name, topology="fake:8", device_kind="TPU v5 lite",
                 n_devices=8, mesh={"data": 8, "fsdp": 1, "tensor": 1, "expert": 1},
                 argument_bytes=state, output_bytes=state, alias_bytes=state, temp_bytes=1000,
                 code_bytes=0, hbm_bytes=state // 2, flops=None, collectives={}, compile_s=0.0,
                 state_bytes=state)
  assert r.fits is False
  text = aot_report.fit_advice(r, cfg, devices)
  assert "over by" in text and "--set mesh.data=" in text and "mesh.fsdp=" in text
  # Temporaries alone above HBM: no fsdp move can help; the advice says so.
  r2 = dataclasses.replace(r, temp_bytes=state * 4)
  assert "temporaries dominate" in aot_report.fit_advice(r2, cfg, devices)


def test_compiled_tpu_program_fits_by_the_compilers_word():
  """A program the TPU compiler accepted fits, even a hair over our summed peak; within 5% of
  HBM it is reported tight (with a note), not as fitting comfortably."""
  gib = aot.GiB
  r = aot.Report(what="train_step", config="c", topology="v5p:4x4x4", device_kind="TPU v5",
                 n_devices=64, mesh={"data": 4, "fsdp": 16, "tensor": 1, "expert": 1},
                 argument_bytes=gib, output_bytes=gib, alias_bytes=gib, temp_bytes=95 * gib,
                 code_bytes=0, hbm_bytes=aot.hbm_bytes("TPU v5"), flops=1e12, collectives={},
                 compile_s=1.0, state_bytes=gib, compiler_checked=True)
  assert r.peak_bytes > r.hbm_bytes and r.fits is True and r.tight
  assert "yes, tight" in aot_report.format_reports([r])
  assert "no headroom" in aot_report.tight_note(r) and "mesh.fsdp" in aot_report.tight_note(r)
  gpu_note = aot_report.tight_note(dataclasses.replace(r, device_kind="NVIDIA H200"))
  assert "TPU compiler" not in gpu_note and "mesh.fsdp" in gpu_note
  roomy = dataclasses.replace(r, temp_bytes=10 * gib)
  assert roomy.fits and not roomy.tight
  assert "| yes |" in aot_report.format_reports([roomy])
  # Not compiled by the TPU compiler (or refused by it): the byte sum / the refusal decides.
  assert dataclasses.replace(r, compiler_checked=False).fits is False
  assert dataclasses.replace(r, oom="RESOURCE_EXHAUSTED: ...").fits is False


def test_with_xla_ops_sets_every_implementation():
  for name in ("tiny_symboliclight_cpu", "tiny_unipool_cpu", "tiny_cpu"):
    cfg = aot.with_xla_ops(configs.get_preset(name))
    m = cfg.model
    assert m.attention.implementation == "xla" and m.moe.implementation == "xla"
    assert m.spiking.lif_implementation == "xla" and m.spiking.scan_implementation == "xla"
    assert dataclasses.replace(cfg, model=configs.get_preset(name).model) == \
        configs.get_preset(name)  # nothing else changed


def test_decode_fit_advice_names_the_knobs():
  r = aot.Report(what="decode_step b512 cache4096", config="c", topology="v5e:2x2",
                 device_kind="TPU v5 lite", n_devices=4,
                 mesh={"data": 4, "fsdp": 1, "tensor": 1, "expert": 1},
                 argument_bytes=20 * aot.GiB, output_bytes=0, alias_bytes=0, temp_bytes=0,
                 code_bytes=0, hbm_bytes=16 * aot.GiB, flops=None, collectives={},
                 compile_s=0.0, state_bytes=2 * aot.GiB)
  text = aot_report.decode_fit_advice(r)
  assert "over by 4.00 GiB" in text and "--decode_batch" in text and "mesh.tensor" in text


def test_topology_without_libtpu_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(aot, "has_libtpu", lambda: False)
  aot.topology_devices.cache_clear()
  with pytest.raises(aot.AotUnavailable, match="libtpu"):
    aot.topology_devices("v5e:2x2")
  aot.topology_devices.cache_clear()


# ----------------------------------------------------------------------------- libtpu

XLA_IMPLS = ("model.attention.implementation=xla", "model.moe.implementation=xla")
# Every tiny preset (dense, MoE, UniPool, SymbolicLight, NSA).
TINY = tuple(n for n in configs.names() if n.startswith("tiny_"))
# The structure is what these tests check, not the size: 2 scanned layers and a smaller batch
# compile ~30% faster for the TPU (tiny_nsa_cpu 34 -> 20 s on this host). seq_len stays at the
# presets' 128 (the Mosaic kernels' tiles).
SMALL_STEP = ("model.n_layers=2", "train.batch_size=8")


@pytest.mark.tpu_aot
@pytest.mark.parametrize("preset", TINY)
def test_tiny_train_step_compiles_v5e(preset):
  """Sharded (data=2, fsdp=2) train step of each tiny preset compiles for a v5e:2x2 slice
  (with the XLA implementations of the ops: see test_tiny_train_step_default_kernels_v5e)."""
  cfg = aot.with_xla_ops(apply_overrides(configs.get_preset(preset),
                                         ["mesh.data=2", "mesh.fsdp=2", *SMALL_STEP]))
  r = aot.compile_train_step(cfg, aot.topology_devices("v5e:2x2"), "v5e:2x2")
  assert r.device_kind == "TPU v5 lite" and r.n_devices == 4
  assert r.fits is True and not r.oom
  assert r.peak_bytes > r.state_bytes > 0
  assert r.flops and r.flops > 0
  assert sum(r.collectives.values()) >= 1  # gradient reduction over data/fsdp


@pytest.mark.tpu_aot
@pytest.mark.parametrize("preset,mesh", [("tiny_cpu", "mesh.data=4"),
                                         ("tiny_cpu", "mesh.tensor=2,mesh.fsdp=2"),
                                         ("tiny_symboliclight_cpu", "mesh.data=4"),
                                         # UniPool's deferred pool gradient (per-device tgmm)
                                         ("tiny_unipool_cpu",
                                          "mesh.data=4,model.moe.pool_grad=deferred")])
def test_tiny_train_step_default_kernels_v5e(preset, mesh):
  """The layers run the Mosaic kernels per device (shard_map), so the default TPU
  implementations compile on a multi-chip mesh."""
  cfg = apply_overrides(configs.get_preset(preset), [*mesh.split(","), *SMALL_STEP])
  aot.compile_train_step(cfg, aot.topology_devices("v5e:2x2"), "v5e:2x2")


@pytest.mark.tpu_aot
@pytest.mark.parametrize("preset", ["tiny_cpu", "tiny_symboliclight_cpu"])
def test_tiny_decode_step_compiles_v5e(preset):
  """Each model kind's own cache (transformer K/V; SymbolicLight's carried states)."""
  cfg = aot.with_xla_ops(apply_overrides(configs.get_preset(preset), ["mesh.data=4"]))
  r = aot.compile_decode_step(cfg, aot.topology_devices("v5e:2x2"), "v5e:2x2", batch=8,
                              cache_len=64)
  assert r.fits is True and r.what.startswith("decode_step")


@pytest.mark.tpu_aot
def test_dense_1b_does_not_fit_v5e_2x2():
  """dense_1b at its own 4096 tokens, batch 8 on four 16 GiB chips with replicated params and
  Adam state (11 GiB a chip) cannot fit: a report with advice, not a crash. (At 1024 tokens
  the unrolled layers fit; the scanned ones did not.)"""
  cfg = apply_overrides(configs.get_preset("dense_1b"),
                        ["mesh.data=4", "train.batch_size=8", "train.seq_len=4096", *XLA_IMPLS])
  res = aot.check(cfg, "v5e:2x2", programs=("train",))
  assert not res.ok and not res.errors
  (r,) = res.reports
  assert r.fits is False
  assert "over by" in res.advice[0] and "mesh." in res.advice[0]


def test_fit_advice_names_the_deferred_pool_gradient_for_unipool():
  """The deferred pool gradient holds every layer's expert rows: advice for a UniPool config
  that does not fit names the per_layer / chunk way out; other configs get no such line."""
  from jaxlm import configs
  unipool = configs.get_preset("unipool_469m")
  assert unipool.model.moe.pool_grad == "deferred"
  assert "model.moe.pool_grad=per_layer" in aot_report.activation_memory_hints(unipool)
  assert "pool_grad_chunk" in aot_report.activation_memory_hints(unipool)
  per_layer = dataclasses.replace(unipool, model=dataclasses.replace(
      unipool.model, moe=dataclasses.replace(unipool.model.moe, pool_grad="per_layer")))
  assert "pool_grad" not in aot_report.activation_memory_hints(per_layer)
  assert "pool_grad" not in aot_report.activation_memory_hints(configs.get_preset("dense_125m"))
  cfg = _tiny("tiny_unipool_cpu", "mesh.data=8", "model.moe.pool_grad=deferred")
  devices = jax.devices()[:8]
  state = aot_report.state_bytes_for_mesh(cfg, devices, cfg.mesh)
  r = aot.Report(what="train_step", config=cfg.name, topology="fake:8", device_kind="TPU v5 lite",
                 n_devices=8, mesh={"data": 8, "fsdp": 1, "tensor": 1, "expert": 1},
                 argument_bytes=state, output_bytes=state, alias_bytes=state,
                 temp_bytes=state * 4, code_bytes=0, hbm_bytes=state // 2, flops=None,
                 collectives={}, compile_s=0.0, state_bytes=state)
  assert "model.moe.pool_grad=per_layer" in aot_report.fit_advice(r, cfg, devices)


def test_memory_hint_names_loss_chunks_for_large_logits():
  """dense_125m: 64 x 1024 tokens x 32768 vocab = 8 GiB of f32 logits a micro-batch."""
  from jaxlm import configs
  from jaxlm.config import apply_overrides
  dense = configs.get_preset("dense_125m")
  assert "train.loss_chunks=8" in aot_report.activation_memory_hints(dense)
  assert "8.0 GiB" in aot_report.activation_memory_hints(dense)
  chunked = apply_overrides(dense, ["train.loss_chunks=8"])
  small = apply_overrides(dense, ["train.batch_size=4"])         # 0.5 GiB of logits
  odd = apply_overrides(dense, ["train.seq_len=1023"])           # no chunk count divides it
  for cfg in (chunked, small, odd):
    assert aot_report.activation_memory_hints(cfg) == ""
