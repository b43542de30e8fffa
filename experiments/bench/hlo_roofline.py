"""A rough roofline of a compiled XLA program: where a step's bytes and FLOPs go, per kernel.

  XLA_FLAGS="--xla_dump_to=/tmp/d --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" \\
      python experiments/aot_compile.py --topology=h200 --config=symboliclight_194m \\
      --programs=train
  python experiments/bench/hlo_roofline.py \\
      --hlo=/tmp/d/module_0001.jit_train_step.sm_9.0a_gpu_after_optimizations.txt

For each launched op of the optimized module (a fusion, a custom call such as a cuBLAS GEMM or
a Pallas kernel, a copy), bytes = its operands + its result, FLOPs = its dots; time =
max(bytes / bandwidth, FLOPs / peak) + a launch cost. While bodies count their
known_trip_count times. In-place updates count the slice they write, and fusion parameters
read only through dynamic slices count the slices. Fusions that only broadcast constants are
kind "fill" (XLA zero-fills the stacked buffers of a scan's outputs every step). Pallas calls
count bytes only, except those with a grouped matmul's signature (ops.gmm: lhs [m, k] and
rhs [g, k, n] or [g, n, k] -> [m, n]; tgmm: [m, k] and [m, n] -> [g, k, n]), which count
2 m k n FLOPs.

A guide to which passes over memory a step makes, and which of them are avoidable. It is not
a timing: GEMM efficiency, overlap and the compiler's choices on the device differ (session
22: it called the MoE presets faster unrolled, and the GPU said 2.2x slower). Session 23 used
it on SymbolicLight's loss, where it counted six passes over the f32 logits (166 -> 146 ms
estimated after the fixes); session 24 on the MoE steps (results/bench/session24_*.md).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import sys

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "s64": 8, "u64": 8, "f64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-start",
         "copy-done"}
_INSTR = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")


@dataclasses.dataclass
class Op:
  name: str
  kind: str          # fusion:<kind>, triton_gemm, cc:<custom call target>, copy, ...
  shape: str
  times: int         # launches per step (trip counts of the loops around it)
  bytes: float       # per launch
  flops: float       # per launch
  seconds: float     # per step, all launches


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, tuples summed: 'bf16[8,128]{1,0}' -> 2048."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]", shape):
    if dtype in _DTYPE_BYTES:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      total += n * _DTYPE_BYTES[dtype]
  return total


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction (the text up to its closing parenthesis)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def grouped_matmul_flops(out_shape: str, operand_shapes: list[str]) -> float:
  """2 m k n for a kernel call shaped like a grouped matmul (a gmm, or its tgmm), else 0.

  The kernel's body is opaque here; its operands and result are not. Every row takes part in
  one group's product, so padding visits and skipped empty groups are not counted."""
  out = _dims(out_shape)
  ops = [_dims(s) for s in operand_shapes]
  flat = [o for o in ops if len(o) == 2]
  if len(out) == 2:                          # gmm: [m, k] x [g, k, n] / [g, n, k] -> [m, n]
    m, n = out
    for w in (o for o in ops if len(o) == 3):
      for x in flat:
        if x[0] == m and (w[1:] == [x[1], n] or w[1:] == [n, x[1]]):
          return 2.0 * m * x[1] * n
  if len(out) == 3:                          # tgmm: [m, k] x [m, n] -> [g, k, n]
    _, k, n = out
    for x in flat:
      for y in flat:
        if x[1] == k and y[1] == n and x[0] == y[0] and x is not y:
          return 2.0 * x[0] * k * n
  return 0.0


def _is_fill(comp_instrs) -> bool:
  """A fused computation that only broadcasts constants (no parameters)."""
  return bool(comp_instrs) and all(
      op in ("constant", "broadcast", "copy", "tuple", "bitcast") for _, _, op, _, _ in comp_instrs)


def _matmul_flops(out_shape: str, lhs_shape: str, contracting: str) -> float:
  """2 x output elements x the lhs dimensions listed (digits) in `contracting`."""
  lhs = _dims(lhs_shape)
  n = 1
  for d in _dims(out_shape):
    n *= d
  for d in re.findall(r"\d+", contracting):
    n *= lhs[int(d)]
  return 2.0 * n


def _dot_flops(line: str, out_shape: str, lhs_shape: str) -> float:
  """FLOPs of one HLO dot instruction."""
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
  return _matmul_flops(out_shape, lhs_shape, contracting.group(1) if contracting else "")


class _Module:
  def __init__(self, text: str):
    self.comps: dict[str, list[tuple]] = {}
    self.entry = None
    cur = None
    for line in text.split("\n"):
      header = _HEADER.match(line)
      if header and not line.startswith(" "):
        cur = header.group(2)
        self.comps[cur] = []
        if header.group(1):
          self.entry = cur
        continue
      m = _INSTR.match(line.strip()) if cur else None
      if m:
        name, shape, op, rest = m.groups()
        self.comps[cur].append((name, shape, op, rest, line.strip()))
    self.shapes = {(c, i[0]): i[1] for c, ins in self.comps.items() for i in ins}

  def dot_flops(self, comp: str) -> float:
    """FLOPs of the dots of a (fused) computation."""
    return sum(_dot_flops(line, shape, self.shapes.get((comp, _operands(rest)[0]), ""))
               for name, shape, op, rest, line in self.comps.get(comp, []) if op == "dot")

  def fusion_bytes(self, comp: str, operand_shapes: list[str], out_shape: str) -> float:
    """Operands + result of a fusion calling `comp`, with in-place updates at their slice and
    parameters read only through dynamic slices at the slices' size."""
    ins = self.comps.get(comp, [])
    params = {}
    for name, shape, op, rest, _ in ins:
      if op == "parameter":
        params[int(re.match(r"\s*(\d+)", rest).group(1))] = name
    users = collections.defaultdict(list)
    for name, shape, op, rest, _ in ins:
      for pos, o in enumerate(_operands(rest)):
        users[o].append((op if pos == 0 else f"{op}:{pos}", shape))   # 0: the sliced array
    total = 0.0
    root = next((i for i in ins if i[4].startswith("ROOT")), None)
    in_place = None
    if root is not None and root[2] == "dynamic-update-slice":
      buffer, update = _operands(root[3])[:2]
      in_place = buffer                # written where it lies: only the slice moves
      total += shape_bytes(self.shapes.get((comp, update), ""))
    else:
      total += shape_bytes(out_shape)
    for i, shape in enumerate(operand_shapes):
      p = params.get(i)
      if p is not None and p == in_place:
        continue
      uses = users.get(p, []) if p is not None else []
      if uses and all(op == "dynamic-slice" for op, _ in uses):
        total += sum(shape_bytes(s) for _, s in uses)
      else:
        total += shape_bytes(shape)
    return total


def estimate(text: str, bandwidth: float = 3.7e12, peak_flops: float = 700e12,
             launch_s: float = 2e-6) -> list[Op]:
  """The launched ops of an optimized HLO module's text, each with its roofline time."""
  mod = _Module(text)
  ops: list[Op] = []

  def walk(comp: str, times: int):
    for name, shape, op, rest, line in mod.comps.get(comp, []):
      if op in _FREE:
        continue
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        walk(re.search(r"body=%?([\w.\-]+)", line).group(1),
             times * (int(trips.group(1)) if trips else 1))
        continue
      if op in ("conditional", "call"):
        for callee in re.findall(r"(?:branch_computations=\{|true_computation=|"
                                 r"false_computation=|to_apply=)%?([\w.\-]+)", line):
          walk(callee, times)
        continue
      operand_shapes = [mod.shapes.get((comp, o), "") for o in _operands(rest)]
      called = re.search(r"calls=%?([\w.\-]+)", line)
      flops, kind = 0.0, op
      if op == "fusion":
        fusion_kind = re.search(r"kind=(\w+)", line)
        kind = "fusion:" + (fusion_kind.group(1) if fusion_kind else "?")
        if "__triton_gemm" in line or name.startswith("gemm_fusion"):
          kind = "triton_gemm"
        elif called and _is_fill(mod.comps.get(called.group(1))):
          kind = "fill"
        nbytes = (mod.fusion_bytes(called.group(1), operand_shapes, shape) if called
                  else shape_bytes(shape) + sum(map(shape_bytes, operand_shapes)))
        flops = mod.dot_flops(called.group(1)) if called else 0.0
      else:
        nbytes = shape_bytes(shape) + sum(map(shape_bytes, operand_shapes))
        if op == "custom-call":
          target = re.search(r'custom_call_target="([^"]+)"', line)
          kind = "cc:" + (target.group(1) if target else "?")
          contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
          blas = target and any(w in target.group(1).lower() for w in ("gemm", "matmul"))
          if blas and contracting and operand_shapes:    # cuBLAS gemm and cuBLASLt matmul
            flops = _matmul_flops(shape, operand_shapes[0], contracting.group(1))
          else:
            flops = grouped_matmul_flops(shape, operand_shapes)
        elif op == "dot":
          flops = _dot_flops(line, shape, operand_shapes[0] if operand_shapes else "")
      seconds = (max(nbytes / bandwidth, flops / peak_flops) + launch_s) * times
      ops.append(Op(name, kind, shape, times, nbytes, flops, seconds))

  walk(mod.entry, 1)
  return ops


def format_estimate(ops: list[Op], n_kinds: int = 12, n_top: int = 25) -> str:
  total = sum(o.seconds for o in ops)
  lines = [f"estimate {total * 1e3:.1f} ms a step, {sum(o.times for o in ops)} launches",
           "| kind | ms | launches | GB | TFLOP |", "|---|---|---|---|---|"]
  kinds = collections.defaultdict(lambda: [0.0, 0, 0.0, 0.0])
  for o in ops:
    k = kinds[o.kind]
    k[0] += o.seconds
    k[1] += o.times
    k[2] += o.bytes * o.times
    k[3] += o.flops * o.times
  for kind, (s, n, b, f) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:n_kinds]:
    lines.append(f"| {kind} | {s * 1e3:.2f} | {n} | {b / 1e9:.2f} | {f / 1e12:.2f} |")
  lines += ["", "| op | kind | ms (all launches) | launches | GB each | shape |",
            "|---|---|---|---|---|---|"]
  for o in sorted(ops, key=lambda o: -o.seconds)[:n_top]:
    lines.append(f"| {o.name} | {o.kind} | {o.seconds * 1e3:.2f} | {o.times} | "
                 f"{o.bytes / 1e9:.3f} | {o.shape[:60]} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  with open(f.hlo) as fh:
    ops = estimate(fh.read(), f.bandwidth_gbs * 1e9, f.peak_tflops * 1e12, f.launch_us * 1e-6)
  print(format_estimate(ops, f.kinds, f.top))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from absl import app, flags
  flags.DEFINE_string("hlo", None, "an *_after_optimizations.txt of --xla_dump_to", required=True)
  flags.DEFINE_float("bandwidth_gbs", 3700.0, "memory bandwidth (the copy rate bench_ops measures)")
  flags.DEFINE_float("peak_tflops", 700.0, "matmul peak (bench_train measures it)")
  flags.DEFINE_float("launch_us", 2.0, "cost of one launch")
  flags.DEFINE_integer("kinds", 12, "rows of the per-kind table")
  flags.DEFINE_integer("top", 25, "rows of the per-op table")
  app.run(main)
