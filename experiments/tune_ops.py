"""Block-size sweep of a memory-bound op's Pallas GPU kernels (ops.lif, ops.scan).

  python experiments/tune_ops.py --op=lif --shape=1,8192,8192,float32 \
      --grid=time_chunk=64,128 --grid=block_c=32,64 --grid=num_warps=1,2

Every combination of the --grid values (fields of the op's config dataclass, the rest from
`Config.for_device`) is timed forward and forward+backward on one shape, next to the HBM copy
bandwidth measured in the same process; the table is sorted by forward+backward time. A
combination the config rejects (e.g. time_chunk not a multiple of ckpt_every) is listed as
skipped with the reason. The chosen values belong in the op's `for_device` defaults.
"""
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

_OP = flags.DEFINE_enum("op", "lif", ["lif", "scan"], "op whose Triton config is swept")
_SHAPE = flags.DEFINE_string("shape", "1,8192,8192,float32", "batch,time,channels,dtype")
_GRID = flags.DEFINE_multi_string("grid", [], "field=v1,v2,... (ints); repeat per field")
_BUDGET = flags.DEFINE_float("budget_s", 240.0, "stop starting new configs after this long")
_OUT = flags.DEFINE_string("out", "", "also write the markdown table here")


def parse_grid(items: list[str], fields: set[str]) -> dict[str, list[int]]:
  """'--grid time_chunk=64,128' strings -> {field: [values]}; unknown fields are an error."""
  grid = {}
  for item in items:
    name, sep, values = item.partition("=")
    if not sep or not values:
      raise app.UsageError(f"--grid {item!r}: expected field=v1,v2,...")
    if name not in fields:
      raise app.UsageError(f"--grid: {name!r} is not a config field; choose from {sorted(fields)}")
    try:
      grid[name] = [int(v) for v in values.split(",")]
    except ValueError:
      raise app.UsageError(f"--grid {item!r}: values must be integers") from None
  return grid


def parse_shape(text: str):
  parts = text.split(",")
  if len(parts) != 4:
    raise app.UsageError(f"--shape {text!r}: expected batch,time,channels,dtype")
  try:
    b, t, c = (int(p) for p in parts[:3])
  except ValueError:
    raise app.UsageError(f"--shape {text!r}: batch, time and channels must be integers") from None
  if parts[3] not in ("float32", "bfloat16", "float16"):
    raise app.UsageError(f"--shape {text!r}: dtype must be float32, bfloat16 or float16")
  return b, t, c, parts[3]


def _workload(op, shape):
  """(make_fns(config) -> (fwd, fwd_bwd), fwd args, fwd+bwd args, fwd bytes, total bytes); the
  inputs are made once and shared by every config."""
  import jax
  import jax.numpy as jnp
  b, t, c, dt = shape
  dt = jnp.dtype(dt)
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (b, t, c), jnp.float32).astype(dt)
  g = jax.random.normal(k[1], (b, t, c), jnp.float32).astype(dt)
  big, small = b * t * c * dt.itemsize, b * c * 4
  if op == "lif":
    from ops.lif import lif
    x = (1.2 * x).astype(dt)        # spikes on a fair share of steps
    op_fn = lambda cfg: lambda x: lif(x, implementation="pallas_triton", config=cfg)[0]
    args, fwd_bytes, bwd_bytes = (x,), 2 * big + 2 * small, 3 * big + 2 * small
  else:
    from ops.scan import linear_scan
    a = jax.random.uniform(k[2], (b, t, c), jnp.float32, 0.9, 1.0).astype(dt)
    op_fn = lambda cfg: lambda a, x: linear_scan(a, x, implementation="pallas_triton",
                                                 config=cfg)[0]
    args, fwd_bytes, bwd_bytes = (a, x), 3 * big + 2 * small, 5 * big + 2 * small

  def make_fns(config):
    f = op_fn(config)

    def fwd_bwd(*a):
      out, vjp = jax.vjp(f, *a[:-1])
      return out, vjp(a[-1])

    return jax.jit(f), jax.jit(fwd_bwd)

  return make_fns, args, args + (g,), fwd_bytes, fwd_bytes + bwd_bytes


def main(argv):
  del argv
  import jax
  from experiments.bench import timing
  if _OP.value == "lif":
    from ops.lif import LifConfig as Config
  else:
    from ops.scan import ScanConfig as Config
  fields = {f.name for f in dataclasses.fields(Config)}
  grid = parse_grid(_GRID.value, fields)
  shape = parse_shape(_SHAPE.value)
  if jax.default_backend() != "gpu":
    raise app.UsageError("tune_ops times the Pallas Triton kernels: it needs a GPU")
  base = Config.for_device(jax.devices()[0].device_kind)
  copy = timing.copy_bandwidth_gbs()
  print(f"{jax.devices()[0].device_kind}; copy {copy:.0f} GB/s; base {base}", flush=True)
  make_fns, a_f, a_fb, nb_f, nb_fb = _workload(_OP.value, shape)
  rows, t0 = [], time.perf_counter()
  names = list(grid)
  for values in itertools.product(*(grid[n] for n in names)):
    label = " ".join(f"{n}={v}" for n, v in zip(names, values))
    if time.perf_counter() - t0 > _BUDGET.value:
      rows.append((float("inf"), f"| {label} | | | | | budget spent |"))
      continue
    try:
      cfg = dataclasses.replace(base, **dict(zip(names, values)))
    except ValueError as e:
      rows.append((float("inf"), f"| {label} | | | | | skipped: {e} |"))
      continue
    fwd, fwd_bwd = make_fns(cfg)
    try:
      ms_f = timing.time_fn(fwd, *a_f, warmup=2, iters=10)
      ms_fb = timing.time_fn(fwd_bwd, *a_fb, warmup=2, iters=10)
    except Exception as e:  # a config Triton cannot compile: report it and go on
      rows.append((float("inf"), f"| {label} | | | | | failed: {type(e).__name__}: "
                   f"{str(e)[:80]} |"))
      continue
    gf, gfb = nb_f / ms_f / 1e6, nb_fb / ms_fb / 1e6
    line = (f"| {label} | {ms_f:.3f} | {gf / copy:.0%} | {ms_fb:.3f} | {gfb / copy:.0%} | |")
    print(line, flush=True)
    rows.append((ms_fb, line))
  head = (f"### {_OP.value} B{shape[0]} T{shape[1]} C{shape[2]} {shape[3]} (copy {copy:.0f} GB/s)"
          "\n| config | fwd ms | fwd / copy | fwd+bwd ms | fwd+bwd / copy | note |\n|---|---|---|---|---|---|")
  table = head + "\n" + "\n".join(line for _, line in sorted(rows, key=lambda r: r[0]))
  print(table)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
