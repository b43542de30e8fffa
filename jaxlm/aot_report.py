"""Reading compiled TPU programs' reports (jaxlm/aot.py): fit advice (which mesh axes or
settings to grow when a program does not fit, or fits without headroom) and the markdown table
that experiments/aot_compile.py prints."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxlm import sharding
from jaxlm.aot import GiB, TIGHT, COLLECTIVES, Report, _state_bytes
from jaxlm.config import Config, MeshConfig, validate_for_devices


# ----------------------------------------------------------------------------- advice

def _factorizations(n: int, k: int):
  if k == 1:
    yield (n,)
    return
  for d in range(1, n + 1):
    if n % d == 0:
      for rest in _factorizations(n // d, k - 1):
        yield (d,) + rest


def state_bytes_for_mesh(cfg: Config, devices: Sequence, mesh_cfg: MeshConfig) -> int:
  """Exact per-chip params + optimizer-state bytes of `cfg` on another mesh (no compile)."""
  from jaxlm.models.functional import build
  from jaxlm.train.optimizer import make_optimizer
  from jaxlm.train.state import state_layout
  mesh = sharding.make_mesh(mesh_cfg, list(devices))
  abstract, _ = state_layout(build(cfg.model), make_optimizer(cfg.train), mesh)
  return _state_bytes(abstract)


# Above this the loss's logits are worth chunking (unipool_469m, 32 x 1024, vocab 50304: 6.1 GiB
# of f32 logits; chunked in 8, its H200 step needs 76.8 instead of 87.9 GiB).
LOGITS_HINT_BYTES = 1 * GiB


def activation_memory_hints(cfg: Config) -> str:
  """Model settings that hold activation memory beyond the batch's (empty when none is set):
  appended to out-of-memory advice."""
  hints = []
  e = cfg.model.moe
  if e.kind == "unipool" and e.pool_grad == "deferred":
    hints.append("model.moe.pool_grad=deferred holds every layer's expert rows until the pool "
                 "gradient: set model.moe.pool_grad=per_layer (slower at small batches, "
                 "unipool_469m on an H200: 562 against 414 ms at 16 x 1024), or "
                 "model.moe.pool_grad_chunk to defer over fewer layers at a time")
  t = cfg.train
  logits = t.batch_size // t.grad_accum * t.seq_len * cfg.model.vocab_size * 4
  if t.loss_chunks == 1 and logits >= LOGITS_HINT_BYTES:
    chunks = next(n for n in (8, 4, 2, 1) if t.seq_len % n == 0)
    if chunks > 1:
      hints.append(f"the loss holds the micro-batch's float32 logits ({logits / GiB:.1f} GiB, "
                   "split over the batch's devices) about 2.5 times in its backward: "
                   f"train.loss_chunks={chunks} computes them a chunk of the sequence at a time")
  return "; ".join(hints)


def fit_advice(report: Report, cfg: Config, devices: Sequence) -> str:
  """Why a train step does not fit, by how much, and which mesh axes to grow."""
  hbm = report.hbm_bytes
  over = report.peak_bytes - hbm
  lines = [f"  TPU compiler: {report.oom}"] if report.oom else []
  lines[:0] = [
      f"{report.config} does not fit on {report.topology or report.device_kind} "
      f"(mesh {_fmt_mesh(report.mesh)}): needs {report.peak_bytes / GiB:.2f} GiB per chip, "
      f"{report.device_kind} has {hbm / GiB:.1f} GiB: over by {over / GiB:.2f} GiB "
      f"({report.peak_bytes / hbm:.2f}x).",
      f"  params + optimizer state {report.state_bytes / GiB:.2f} GiB/chip, temporaries "
      f"(activations, gathered weights) {report.temp_bytes / GiB:.2f} GiB/chip.",
  ]
  n = len(devices)
  cur = report.mesh
  rest = report.peak_bytes - report.state_bytes
  # Moving devices from data to fsdp keeps the per-chip batch (both split it), so only the
  # state per chip changes: that estimate is sound. tensor also changes activations.
  best = None
  for data, fsdp, tensor in _factorizations(n // cur["expert"], 3):
    cand = MeshConfig(data=data, fsdp=fsdp, tensor=tensor, expert=cur["expert"])
    if (data, fsdp, tensor) == (cur["data"], cur["fsdp"], cur["tensor"]):
      continue
    if data * fsdp != cur["data"] * cur["fsdp"] or tensor != cur["tensor"]:
      continue
    try:
      validate_for_devices(dataclasses.replace(cfg, mesh=cand), n)
    except ValueError:
      continue
    est = rest + state_bytes_for_mesh(cfg, devices, cand)
    if est <= hbm and (best is None or fsdp < best[0].fsdp):
      best = (cand, est)
  if best is not None:
    c, est = best
    lines.append(
        f"  grow mesh.fsdp: --set mesh.data={c.data} --set mesh.fsdp={c.fsdp} shards params and "
        f"optimizer state {c.fsdp}-way (same per-chip batch); estimated {est / GiB:.2f} GiB "
        f"per chip (recompile to confirm).")
  else:
    max_f = cur["data"] * cur["fsdp"]
    lines.append(
        f"  growing mesh.fsdp alone (up to {max_f}, all data devices) is not enough: the "
        f"temporaries dominate. Grow mesh.tensor (splits heads/mlp activations and weights), "
        f"raise train.grad_accum (activations scale with the micro-batch, now "
        f"{cfg.train.batch_size // cfg.train.grad_accum}), set model.remat=full, or use a "
        f"bigger slice.")
  hint = activation_memory_hints(cfg)
  if hint:
    lines.append(f"  {hint}.")
  return "\n".join(lines)


def decode_fit_advice(report: Report) -> str:
  hbm = report.hbm_bytes
  return (
      f"{report.config} {report.what} does not fit on {report.topology or report.device_kind} "
      f"(mesh {_fmt_mesh(report.mesh)}): needs {report.peak_bytes / GiB:.2f} GiB per chip, "
      f"{report.device_kind} has {hbm / GiB:.1f} GiB: over by "
      f"{(report.peak_bytes - hbm) / GiB:.2f} GiB. Params {report.state_bytes / GiB:.2f} "
      f"GiB/chip (grow mesh.fsdp / mesh.tensor to shard them); the KV cache scales with "
      f"--decode_batch and --cache_len (its batch splits over mesh.data x mesh.fsdp, its kv "
      f"heads over mesh.tensor).")


def tight_note(report: Report) -> str:
  why = ("the TPU compiler rematerializes activations under memory pressure to get there "
         "(recompute no FLOP column counts) and a real run has no headroom"
         if "tpu" in report.device_kind.lower() else
         "a real run has little headroom for the allocator's fragmentation")
  return (
      f"note: {report.config} {report.what} on {report.topology or report.device_kind} compiles "
      f"but uses {report.peak_bytes / GiB:.2f} of {report.hbm_bytes / GiB:.1f} GiB per chip "
      f"(>= {TIGHT:.0%}): {why}. For "
      f"room: grow mesh.fsdp (shards params and optimizer state), raise train.grad_accum "
      f"(smaller micro-batch), or set model.remat=full.")


# ----------------------------------------------------------------------------- table

def _fmt_mesh(mesh: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def _gib(b) -> str:
  return f"{b / GiB:.3g}"


def format_reports(reports: Sequence[Report]) -> str:
  """Markdown table, one row per compiled program."""
  head = ("| program | config | topology | chip | mesh | args GiB | out GiB | alias GiB | "
          "temp GiB | peak GiB | HBM GiB | fits | XLA TFLOP/chip | model TFLOP/chip | "
          "step ms @peak | collectives "
          "(AR/AG/RS/A2A/CP) | compile s |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in reports:
    c = r.collectives
    coll = "/".join(str(c.get(k, 0)) for k in COLLECTIVES) if not r.oom else "- (out of HBM)"
    if c.get("ragged-all-to-all"):
      coll += f" +{c['ragged-all-to-all']} ragged A2A"
    fits = "?" if r.fits is None else (("yes, tight" if r.tight else "yes") if r.fits
                                       else "**NO**")
    rows.append(
        f"| {r.what} | {r.config} | {r.topology} | {r.device_kind} | {_fmt_mesh(r.mesh)} | "
        f"{_gib(r.argument_bytes)} | {_gib(r.output_bytes)} | {_gib(r.alias_bytes)} | "
        f"{_gib(r.temp_bytes)} | {_gib(r.peak_bytes)} | "
        f"{'-' if r.hbm_bytes is None else f'{r.hbm_bytes / GiB:.0f}'} | {fits} | "
        f"{'-' if r.flops is None else f'{r.flops / 1e12:.2f}'} | "
        f"{'-' if r.model_flops is None else f'{r.model_flops / 1e12:.2f}'} | "
        f"{'-' if r.min_step_ms is None else f'{r.min_step_ms:.1f}'} | {coll} | "
        f"{r.compile_s:.1f} |")
  return "\n".join(rows)


flops_note = ("XLA TFLOP/chip: cost analysis of the compiled per-chip program; it counts a "
              "while-loop body once (scanned layers, grad_accum) and skips Pallas (Mosaic) "
              "custom calls, so it undercounts. model TFLOP/chip: analytic 6N + attention "
              "(jaxlm.train.metrics). step ms @peak = model (else XLA) TFLOP/chip / datasheet "
              "bf16 peak.")
