"""Ahead-of-time compilation for TPU topologies on a CPU host: does a run fit before you rent it?

NVIDIA GPUs work the same way through jax's CUDA plugin (the [gpu] extra): topology names
"h100", "h200:2", "h200:2x8" (jaxlm/gpu_targets.py); memory is checked against what jax's GPU
allocator gets (gpu_targets.usable_memory_bytes), since the GPU compiler does not refuse a
program for its size. What follows is about TPUs.

With libtpu installed (`pip install -e .[tpu]`), `jax.experimental.topologies` describes the
devices of a TPU slice that is not attached, and `jax.jit(f).lower(<ShapeDtypeStructs sharded
over a Mesh of those devices>).compile()` runs the real TPU compiler — SPMD partitioning, Mosaic
(Pallas TPU) kernel lowering included — on the CPU. The compiled program's `memory_analysis()`
gives per-chip argument / output / temporary bytes, `cost_analysis()` the FLOPs per chip, and
its HLO text the collectives.

    report = aot.compile_train_step(cfg, aot.topology_devices("v5p:4x4x4"))
    print(aot_report.format_reports([report]))

What works here (jax 0.10.2 + libtpu 0.0.42, checked):
  * JAX_PLATFORMS=cpu (the local backend stays CPU, no TPU is probed); the topology API still
    loads libtpu as a compile-only client. libtpu prints warnings about TPU_ACCELERATOR_TYPE /
    TPU_WORKER_HOSTNAMES when no TPU VM metadata is found: harmless (`quiet_libtpu()` sets
    placeholders before the first call to silence them).
  * Topology names "<gen>:<shape>": v4:2x2x1 (8 devices: v4 exposes both cores of a chip),
    v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:4x4x4, v6e:2x2, v6e:16x16 … Single-host slices need at
    least 2x2 (v5e:1x1 is rejected by libtpu).
  * libtpu takes a per-host lockfile: a second process fails with "Internal error when
    accessing libtpu multi-process lockfile" unless ALLOW_MULTIPLE_LIBTPU_LOAD=1 (set by
    `quiet_libtpu`).
  * XLA's cost analysis counts a while-loop body once: with model.scan_layers=True its FLOPs
    are ~1 layer's; reports carry the analytic model FLOPs as well.
  * One device of a topology (SingleDeviceSharding) compiles single-chip programs: this is how
    the Pallas kernels are checked (tests/ops/test_tpu_aot.py).
  * Pallas' Mosaic lowering reads the target chip from the ambient mesh (tpu_info reads
    get_abstract_mesh().abstract_device, else the default device = CPU → "Unsupported TPU
    device kind: cpu"): always lower inside `sharding.use_mesh(<mesh of topology devices>)`.
  * Mosaic kernels cannot be partitioned automatically: a pallas_call that sees sharded
    operands outside shard_map fails to lower ("Mosaic kernels cannot be automatically
    partitioned. Please wrap the call in a shard_map.").

`ops` picks implementations by the platform it runs on; `target_devices` makes ops trace for
the topology's chip (ops._backend.target), so default implementation lists and block sizes are
the TPU ones and Pallas kernels are compiled, not interpreted. Traces made under a target
would be wrong on the local CPU, so jax's caches are cleared on entering and leaving it.

Numbers: per-chip bytes are the compiled program's; `peak` = arguments + outputs − aliased
(donated state) + temporaries + generated code. XLA's cost analysis counts FLOPs of XLA ops
only: the FLOPs inside Pallas custom calls are not included (see `aot_report.flops_note`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxlm import host_env, sharding
from jaxlm.config import Config, validate_for_devices

GiB = 1024 ** 3

# HBM per chip by device kind (Cloud TPU datasheets). One jax device is one chip on every
# generation listed here except v4 topologies, which expose each TensorCore separately when
# megacore is off (libtpu's v4:2x2x1 has 8 devices for 4 chips): there the number is per core.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,   # v5e
    "TPU v5": int(95.74 * GiB),  # v5p (the TPU compiler's "available HBM")
    "TPU v6 lite": 32 * GiB,   # v6e (Trillium)
    "TPU7x": 192 * GiB,        # Ironwood
}

TIGHT = 0.95  # a fitting program above this fraction of HBM is reported as tight

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class AotUnavailable(RuntimeError):
  """libtpu (the TPU compiler) is not installed or cannot describe the topology."""


def has_libtpu() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def quiet_libtpu() -> None:
  """Before libtpu first loads: no TPU-VM metadata errors, several compile-only clients."""
  host_env.libtpu_placeholders()


def has_gpu_compiler() -> bool:
  """The CUDA PJRT plugin (jax[cuda13], the [gpu] extra) is installed."""
  return host_env.has_cuda_plugin()


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
  """Devices of a TPU topology, e.g. "v5p:4x4x4" (64 chips), or of NVIDIA GPUs, e.g. "h200:2"
  (jaxlm/gpu_targets.py), compile-only."""
  from jaxlm import gpu_targets
  if gpu_targets.is_gpu_topology(name):
    return _gpu_topology_devices(name)
  if not has_libtpu():
    raise AotUnavailable("libtpu is not installed: pip install -e '.[tpu]' (about 700 MB)")
  quiet_libtpu()  # before libtpu first loads
  if ":" not in name:
    raise ValueError(f"topology {name!r}: expected <generation>:<shape>, e.g. v5p:4x4x4, "
                     "or NVIDIA GPUs, e.g. h100, h200:2")
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu's own error (unknown generation, bad shape…)
    raise ValueError(f"topology {name!r}: {e}") from e
  return tuple(topo.devices)


def _gpu_topology_devices(name: str) -> tuple:
  from jaxlm import gpu_targets
  spec, hosts, n = gpu_targets.parse(name)
  if not has_gpu_compiler():
    raise AotUnavailable("the XLA GPU compiler (the CUDA PJRT plugin) is not installed: "
                         "pip install -e '.[gpu]' (about 3.5 GB; no GPU needed to compile)")
  # Too late if jax has already initialised its backends (host_env.cuda_plugin_without_gpu).
  host_env.cuda_plugin_without_gpu()
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(
        name, platform="cuda", target_config=gpu_targets.target_config(spec),
        topology=f"1 x {hosts} x {n}")
  except NotImplementedError as e:  # jax dropped the plugin when its backends started
    raise AotUnavailable(
        f"GPU topology {name!r}: jax did not load the CUDA plugin. Without a GPU it needs "
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts "
        "(jaxlm.host_env.cuda_plugin_without_gpu)") from e
  except Exception as e:  # noqa: BLE001 - the plugin's own message
    raise AotUnavailable(
        f"GPU topology {name!r}: the CUDA plugin could not describe it: {e}") from e
  return tuple(topo.devices)


def hbm_bytes(device_kind: str) -> int | None:
  from jaxlm import gpu_targets
  usable = gpu_targets.usable_memory_bytes(device_kind)
  if usable is not None:
    return usable
  # Longest key first: "TPU v5 lite" must not match "TPU v5".
  for key in sorted(HBM_BYTES, key=len, reverse=True):
    if device_kind.lower().startswith(key.lower()):
      return HBM_BYTES[key]
  return None


@contextlib.contextmanager
def target_devices(devices: Sequence):
  """Trace ops for the platform / chip of `devices` (no-op for local devices)."""
  from ops import _backend
  dev = devices[0]
  local = dev.platform == jax.default_backend() or dev.platform == _backend.platform()
  if local:
    yield
    return
  jax.clear_caches()
  try:
    with _backend.target(dev.platform, dev.device_kind):
      yield
  finally:
    jax.clear_caches()


# ----------------------------------------------------------------------------- report

@dataclasses.dataclass
class Report:
  """One compiled program on one topology; bytes are per chip."""
  what: str                       # "train_step" | "decode_step" | a kernel name
  config: str
  topology: str
  device_kind: str
  n_devices: int
  mesh: dict
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int | None
  flops: float | None             # per chip per step, XLA ops only
  collectives: dict
  compile_s: float
  state_bytes: int = 0            # params + optimizer state per chip (train step)
  peak_tflops: float | None = None
  oom: str = ""                   # the TPU compiler's out-of-HBM message (then no program)
  model_flops: float | None = None  # analytic train FLOPs per chip per step (6N + attention)
  # The TPU compiler accepted the program: it checks its buffers against the chip's HBM itself
  # (and fails with RESOURCE_EXHAUSTED, then `oom`), so a compiled TPU program fits by its
  # accounting even when `peak_bytes` (a sum that double-counts reused buffers) is a hair over.
  compiler_checked: bool = False
  # the compiled per-chip program as optimized HLO text (experiments/aot_compile.py --roofline)
  hlo_text: str = dataclasses.field(default="", repr=False)

  @property
  def peak_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool | None:
    if self.oom:
      return False
    if self.hbm_bytes is None:
      return None
    return self.compiler_checked or self.peak_bytes <= self.hbm_bytes

  @property
  def tight(self) -> bool:
    """Within 5% of HBM: the TPU compiler rematerializes under memory pressure to get there
    (extra recompute that no FLOP column shows), and a real run has no headroom."""
    return bool(self.fits and self.hbm_bytes and self.peak_bytes >= TIGHT * self.hbm_bytes)

  @property
  def min_step_ms(self) -> float | None:
    """Model FLOPs (else XLA's) / datasheet peak: the step time at 100% utilisation."""
    flops = self.model_flops or self.flops
    if not flops or not self.peak_tflops:
      return None
    return flops / (self.peak_tflops * 1e12) * 1e3


def count_collectives(hlo_text: str) -> dict:
  """Collective instructions in (compiled) HLO text; async pairs count once (the -start)."""
  counts = {}
  for op in COLLECTIVES:
    # " all-gather(" or " all-gather-start(" as an instruction's opcode; not "-done", and not
    # a longer opcode that ends in the same letters (ragged-all-to-all counts separately).
    counts[op] = len(re.findall(rf"(?<![\w-]){re.escape(op)}(?:-start)?\(", hlo_text))
  counts["ragged-all-to-all"] = len(re.findall(r"(?<![\w-])ragged-all-to-all\(", hlo_text))
  return counts


def _flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends have no cost model
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def _state_bytes(abstract_tree) -> int:
  """Per-device bytes of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def report_of(compiled, *, what: str, config: str, topology: str, devices: Sequence,
              mesh: dict, compile_s: float, state_bytes: int = 0) -> Report:
  from jaxlm.train.metrics import peak_tflops
  ma = compiled.memory_analysis()
  kind = devices[0].device_kind
  text = compiled.as_text()
  return Report(
      what=what, config=config, topology=topology, device_kind=kind, n_devices=len(devices),
      mesh=dict(mesh), argument_bytes=int(ma.argument_size_in_bytes),
      output_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes),
      temp_bytes=int(ma.temp_size_in_bytes), code_bytes=int(ma.generated_code_size_in_bytes),
      hbm_bytes=hbm_bytes(kind), flops=_flops(compiled),
      collectives=count_collectives(text), compile_s=compile_s,
      state_bytes=state_bytes, peak_tflops=peak_tflops(kind),
      compiler_checked=devices[0].platform == "tpu", hlo_text=text)


# ----------------------------------------------------------------------------- programs

_OOM_RE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_oom(message: str) -> tuple[int, int] | None:
  """(temporaries bytes, available HBM bytes) from the TPU compiler's RESOURCE_EXHAUSTED text.

  e.g. "Ran out of memory on HBM, the total memory required for HLO temporaries (105.03G)
  exceeds available HBM (95.74G)." (XLA's "G" is GiB.)
  """
  m = _OOM_RE.search(message)
  if not m:
    return None
  return (int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]))


def oom_report(err: BaseException, *, what: str, config: str, topology: str, devices: Sequence,
               mesh: dict, compile_s: float, argument_bytes: int, state_bytes: int) -> Report:
  """A Report for a program the TPU compiler refused for lack of HBM (fits=False)."""
  from jaxlm.train.metrics import peak_tflops
  parsed = parse_oom(str(err))
  if parsed is None:
    raise err
  temp, avail = parsed
  kind = devices[0].device_kind
  return Report(what=what, config=config, topology=topology, device_kind=kind,
                n_devices=len(devices), mesh=dict(mesh), argument_bytes=argument_bytes,
                output_bytes=state_bytes, alias_bytes=state_bytes, temp_bytes=temp, code_bytes=0,
                hbm_bytes=avail, flops=None, collectives={}, compile_s=compile_s,
                state_bytes=state_bytes, peak_tflops=peak_tflops(kind),
                oom=str(err).strip().splitlines()[0])


def _is_oom(err: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(err) and parse_oom(str(err)) is not None


def _mesh_dict(mesh) -> dict:
  return {k: int(v) for k, v in mesh.shape.items()}


def _compile(fn: Callable, *args):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def abstract_batch(cfg: Config, mesh) -> dict:
  """Global token batch of one optimizer step, sharded over the batch axes."""
  t = cfg.train
  sh = sharding.batch_sharding(mesh)
  spec = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=sh)
  return {"inputs": spec, "targets": spec}


def compile_train_step(cfg: Config, devices: Sequence, topology: str = "") -> Report:
  """Lower and compile the sharded, state-donating train step of `cfg` for `devices`."""
  from jaxlm.models.functional import build
  from jaxlm.train.optimizer import make_optimizer
  from jaxlm.train.state import state_layout
  from jaxlm.train.step import jit_train_step
  devices = list(devices)
  mesh = sharding.mesh_for(cfg, devices)
  with target_devices(devices), sharding.use_mesh(mesh):
    fm = build(cfg.model)
    tx = make_optimizer(cfg.train)
    abstract, shardings = state_layout(fm, tx, mesh)
    step = jit_train_step(fm, cfg, tx, mesh, shardings)
    batch = abstract_batch(cfg, mesh)
    t0 = time.perf_counter()
    try:
      compiled, secs = _compile(step, abstract, batch)
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-HBM error is a report
      if not _is_oom(e):
        raise
      r = oom_report(e, what="train_step", config=cfg.name, topology=topology,
                     devices=devices, mesh=_mesh_dict(mesh),
                     compile_s=time.perf_counter() - t0,
                     argument_bytes=_state_bytes((abstract, batch)),
                     state_bytes=_state_bytes(abstract))
      r.model_flops = model_flops_per_chip(cfg, len(devices))
      return r
  r = report_of(compiled, what="train_step", config=cfg.name, topology=topology,
                devices=devices, mesh=_mesh_dict(mesh), compile_s=secs,
                state_bytes=_state_bytes(abstract))
  r.model_flops = model_flops_per_chip(cfg, len(devices))
  return r


def model_flops_per_chip(cfg: Config, n_devices: int) -> float:
  """Analytic train FLOPs of one optimizer step per chip (jaxlm.train.metrics: fwd+bwd of every
  matmul and causal attention; MoE counts the dense d_ff, not active experts)."""
  from jaxlm.train.model_flops import train_flops_per_token
  t = cfg.train
  return train_flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len / n_devices


def compile_decode_step(cfg: Config, devices: Sequence, topology: str = "",
                        batch: int | None = None, cache_len: int | None = None) -> Report:
  """One-token KV-cache decode step (params in the compute dtype, cache donated).

  batch defaults to the training micro-batch, cache_len to train.seq_len.
  """
  from jaxlm.models.functional import build
  devices = list(devices)
  mesh = sharding.mesh_for(cfg, devices)
  m = cfg.model
  batch = batch or cfg.train.batch_size // cfg.train.grad_accum
  cache_len = cache_len or cfg.train.seq_len
  with target_devices(devices), sharding.use_mesh(mesh):
    fm = build(m)
    p_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(m.dtype)),
                            fm.param_shapes)
    p_sh = sharding.tree_shardings(fm.logical_axes, p_shapes, mesh)
    # The cache of this model kind (transformer K/V, NSA's, SymbolicLight's carried states).
    c_shapes = jax.eval_shape(lambda: fm.init_cache(batch, cache_len))
    c_sh = sharding.tree_shardings(fm.cache_axes, c_shapes, mesh)
    tok_sh = NamedSharding(mesh, sharding.spec_for(("batch", None), (batch, 1), mesh))
    attach = lambda shapes, shs: jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shs)

    def decode(params, cache, tokens):
      logits, cache = fm.apply(params, tokens, cache=cache)
      return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    out_tok_sh = NamedSharding(mesh, sharding.spec_for(("batch",), (batch,), mesh))
    fn = jax.jit(decode, in_shardings=(p_sh, c_sh, tok_sh), out_shardings=(out_tok_sh, c_sh),
                 donate_argnums=1)
    args = (attach(p_shapes, p_sh), attach(c_shapes, c_sh),
            jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tok_sh))
    t0 = time.perf_counter()
    try:
      compiled, secs = _compile(fn, *args)
    except Exception as e:  # noqa: BLE001
      if not _is_oom(e):
        raise
      return oom_report(e, what=f"decode_step b{batch} cache{cache_len}", config=cfg.name,
                        topology=topology, devices=devices, mesh=_mesh_dict(mesh),
                        compile_s=time.perf_counter() - t0, argument_bytes=_state_bytes(args),
                        state_bytes=_state_bytes(args[0]))
  return report_of(compiled, what=f"decode_step b{batch} cache{cache_len}", config=cfg.name,
                   topology=topology, devices=devices, mesh=_mesh_dict(mesh), compile_s=secs,
                   state_bytes=_state_bytes(attach(p_shapes, p_sh)))


def compile_single_device(fn: Callable, args: Sequence[jax.ShapeDtypeStruct], device):
  """Compile `fn(*args)` for one (possibly unattached) device; returns the Compiled object."""
  sh = jax.sharding.SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a in args]
  # The ambient mesh tells Pallas' Mosaic lowering which chip it targets (tpu_info); without
  # one it would ask the default device (the CPU).
  mesh = jax.sharding.Mesh(np.array([device]), ("chip",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  with target_devices([device]), sharding.use_mesh(mesh):
    return jax.jit(fn).lower(*args).compile()


MOSAIC_PARTITION_HINT = (
    "A Pallas TPU kernel was called on sharded operands outside shard_map (Mosaic kernels "
    "cannot be partitioned automatically): a layer calls an ops kernel without "
    "jaxlm.sharding.per_shard. To compile anyway, use the XLA implementations of the ops: "
    "--xla_ops (aot_compile.py), or "
    "--set model.attention.implementation=xla (and model.moe.implementation, "
    "model.spiking.lif_implementation / scan_implementation).")


def with_xla_ops(cfg: Config) -> Config:
  """`cfg` with every ops implementation field (model.attention.implementation,
  model.moe.implementation, model.spiking.{lif,scan}_implementation, …) set to "xla"."""
  def walk(dc):
    changes = {}
    for f in dataclasses.fields(dc):
      v = getattr(dc, f.name)
      if dataclasses.is_dataclass(v):
        changes[f.name] = walk(v)
      elif f.name == "implementation" or f.name.endswith("_implementation"):
        changes[f.name] = "xla"
    return dataclasses.replace(dc, **changes)
  return dataclasses.replace(cfg, model=walk(cfg.model))


def explain_compile_error(err: BaseException) -> str:
  msg = f"{type(err).__name__}: {err}"
  if "cannot be automatically partitioned" in msg:
    return f"{msg}\n{MOSAIC_PARTITION_HINT}"
  return msg


# ----------------------------------------------------------------------------- one call

@dataclasses.dataclass
class CheckResult:
  reports: list
  errors: list                  # (program, message) of programs that failed to compile
  advice: list                  # fit advice of programs that do not fit
  notes: list = dataclasses.field(default_factory=list)  # fitting, but at the HBM limit

  @property
  def ok(self) -> bool:
    return not self.errors and all(r.fits is not False for r in self.reports)

  def text(self) -> str:
    from jaxlm import aot_report
    out = [aot_report.format_reports(self.reports)] if self.reports else []
    out += [aot_report.flops_note] if self.reports else []
    out += [f"\n{prog} FAILED to compile:\n{msg}" for prog, msg in self.errors]
    out += ["\n" + a for a in self.notes]
    out += ["\n" + a for a in self.advice]
    return "\n".join(out)


def check(cfg: Config, topology: str, programs: Sequence[str] = ("train", "decode"),
          decode_batch: int | None = None, cache_len: int | None = None) -> CheckResult:
  """Compile `programs` of `cfg` for every chip of `topology`; never raises on a compile error."""
  from jaxlm import aot_report
  devices = topology_devices(topology)
  validate_for_devices(cfg, len(devices))
  res = CheckResult([], [], [])
  for prog in programs:
    try:
      if prog == "train":
        r = compile_train_step(cfg, devices, topology)
        if r.fits is False:
          res.advice.append(aot_report.fit_advice(r, cfg, devices))
      elif prog == "decode":
        r = compile_decode_step(cfg, devices, topology, batch=decode_batch, cache_len=cache_len)
        if r.fits is False:
          res.advice.append(aot_report.decode_fit_advice(r))
      else:
        raise ValueError(f"unknown program {prog!r}; choose train or decode")
      if r.tight:
        res.notes.append(aot_report.tight_note(r))
      res.reports.append(r)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 - the compiler's message is the result
      res.errors.append((prog, explain_compile_error(e)))
  return res
