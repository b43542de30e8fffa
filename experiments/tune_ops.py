"""Block-size sweep of an op's Pallas GPU kernels (ops.lif, ops.scan, ops.nsa, ops.nsa decode).

  python experiments/tune_ops.py --op=lif --shape=1,8192,8192,float32 \
      --grid=time_chunk=64,128 --grid=block_c=32,64 --grid=num_warps=1,2
  python experiments/tune_ops.py --op=lif --implementation=pallas_mosaic_gpu \
      --grid=mgpu_time_chunk=16,32 --grid=mgpu_block_c=128,256 --grid=mgpu_stages=0,2,4
  python experiments/tune_ops.py --op=nsa --shape=1,65536,64,4,128,bfloat16 \
      --grid=sel_num_warps=4,8 --grid=sel_num_stages=1,2,3 --grid=bwd_chunk=32,64,128
  python experiments/tune_ops.py --op=nsa_decode --shape=8,65536,64,4,128,bfloat16 \
      --grid=decode_cmp_splits=4,8,16 --grid=decode_cmp_num_stages=2,3

Every combination of the --grid values (fields of the op's config dataclass, the rest from
`Config.for_device`; booleans as 0/1) is timed forward and forward+backward on one shape
(milliseconds per call of back-to-back calls, timing.time_pipelined, as bench_ops does), next
to a baseline measured in the same process: the HBM copy bandwidth for the memory-bound lif and
scan (shape batch,time,channels,dtype; measured before and after the sweep, the final table
against the higher), cuDNN full causal attention for nsa (shape
batch,time,heads,kv_heads,head_dim,dtype; the paper's NSAConfig). nsa_decode (shape
batch,cache,heads,kv_heads,head_dim,dtype; one token per row against full caches) has no
backward: its rows are the decode time per step of steps inside one jitted loop
(timing.time_in_loop, what jaxlm.generate's lax.scan sees; back-to-back dispatched calls hide
device differences under the host's dispatch) against full-attention decode (ops.attention's
default) timed the same way on the same raw cache, and the table is sorted by it. Other tables
are sorted by forward+backward time. A combination the config rejects (e.g. time_chunk not a
multiple of ckpt_every) is listed as skipped with the reason. The chosen values belong in the
op's `for_device` defaults.
"""
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

_OP = flags.DEFINE_enum("op", "lif", ["lif", "scan", "nsa", "nsa_decode"],
                        "op whose Triton config is swept")
_SHAPE = flags.DEFINE_string("shape", "1,8192,8192,float32",
                             "lif/scan: batch,time,channels,dtype; "
                             "nsa: batch,time,heads,kv_heads,head_dim,dtype; "
                             "nsa_decode: batch,cache,heads,kv_heads,head_dim,dtype")
_GRID = flags.DEFINE_multi_string("grid", [], "field=v1,v2,... (ints); repeat per field")
_BUDGET = flags.DEFINE_float("budget_s", 240.0, "stop starting new configs after this long")
_OUT = flags.DEFINE_string("out", "", "also write the markdown table here")
_IMPL = flags.DEFINE_enum("implementation", "pallas_triton",
                          ["pallas_triton", "pallas_mosaic_gpu"],
                          "lif / scan: which GPU kernels to sweep (the Mosaic GPU ones read "
                          "the config's mgpu_* fields)")


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


def parse_shape(text: str, op: str = "lif"):
  names = {"nsa": ["batch", "time", "heads", "kv_heads", "head_dim"],
           "nsa_decode": ["batch", "cache", "heads", "kv_heads", "head_dim"]}.get(
               op, ["batch", "time", "channels"])
  parts = text.split(",")
  if len(parts) != len(names) + 1:
    raise app.UsageError(f"--shape {text!r}: expected {','.join(names)},dtype for {op}")
  try:
    dims = tuple(int(p) for p in parts[:-1])
  except ValueError:
    raise app.UsageError(f"--shape {text!r}: {', '.join(names)} must be integers") from None
  if min(dims) < 1:
    raise app.UsageError(f"--shape {text!r}: sizes must be positive")
  if op in ("nsa", "nsa_decode") and dims[2] % dims[3]:
    raise app.UsageError(f"--shape {text!r}: heads {dims[2]} not a multiple of kv_heads {dims[3]}")
  if parts[-1] not in ("float32", "bfloat16", "float16"):
    raise app.UsageError(f"--shape {text!r}: dtype must be float32, bfloat16 or float16")
  return dims + (parts[-1],)


def _config_class(op: str):
  if op == "lif":
    from ops.lif import LifConfig
    return LifConfig
  if op == "scan":
    from ops.scan import ScanConfig
    return ScanConfig
  from ops.nsa.config import NSABlockConfig
  return NSABlockConfig          # nsa and nsa_decode


def _vjp_fns(f):
  import jax

  def fwd_bwd(*a):
    out, vjp = jax.vjp(f, *a[:-1])
    return out, vjp(a[-1])

  return jax.jit(f), jax.jit(fwd_bwd)


def _nsa_workload(shape):
  """(make_fns, fwd args, fwd+bwd args, baseline) for ops.nsa; the baseline is cuDNN full causal
  attention on the same q and window k/v: (label, fwd ms, fwd+bwd ms)."""
  import jax
  import jax.numpy as jnp
  from experiments.bench import timing
  from experiments.bench.nsa import make_inputs
  from ops import nsa as nsa_op
  from ops.nsa.config import NSAConfig
  from ops.nsa.shapes import NSAShape
  b, t, h, hk, d, dt = shape
  cfg = NSAConfig()
  args = make_inputs(NSAShape(b, t, h, hk, d), cfg, jnp.dtype(dt))
  q, ks, vs = args[0], args[3], args[4]
  do = (0.5 * jax.random.normal(jax.random.key(1), q.shape)).astype(q.dtype)
  # cuDNN where it exists (XLA's attention elsewhere, so the workload also runs in CPU tests)
  base_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                       implementation=base_impl)
  base_f, base_fb = _vjp_fns(full)
  ms_f = timing.time_pipelined(base_f, q, ks, vs, calls=50, max_batch_s=0.3)
  ms_fb = timing.time_pipelined(base_fb, q, ks, vs, do, calls=50, max_batch_s=0.3)

  def make_fns(config):
    return _vjp_fns(lambda *a: nsa_op.nsa(*a, cfg=cfg, implementation="pallas_triton",
                                          config=config))

  return make_fns, args, args + (do,), ("cuDNN" if base_impl == "cudnn" else "XLA", ms_f, ms_fb)


def _nsa_decode_workload(shape):
  """(make_fns, args, baseline) for ops.nsa's decode: make_fns(config) -> (decode, None);
  baseline = ("full decode", ms per step in a jitted loop) of ops.attention's default decode on
  the raw cache."""
  import jax
  import jax.numpy as jnp
  from experiments.bench import timing
  from ops.attention import decode_attention
  from ops.nsa import decode as nsa_decode
  from ops.nsa.config import NSAConfig
  b, t, h, hk, d, dt = shape
  cfg = NSAConfig()
  ks = jax.random.split(jax.random.key(1), 6)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(jnp.dtype(dt))
  q = n(ks[0], (b, h, d))
  kc, vc = n(ks[1], (b, cfg.n_cmp(t), hk, d)), n(ks[2], (b, cfg.n_cmp(t), hk, d))
  kraw, vraw = n(ks[3], (b, t, hk, d)), n(ks[4], (b, t, hk, d))
  gates = jax.nn.sigmoid(jax.random.normal(ks[5], (b, h, 3))).astype(jnp.dtype(dt))
  lengths = jnp.full((b,), t, jnp.int32)
  full = lambda q, k, v, l: decode_attention(q[:, None], k, v, l)[:, 0]
  ms_full = timing.time_in_loop(full, q, kraw, vraw, lengths)

  def make_fns(config):
    return jax.jit(lambda *a: nsa_decode.nsa_decode(
        *a, cfg=cfg, implementation="pallas_triton", config=config)), None

  return make_fns, (q, kc, vc, kraw, vraw, kraw, vraw, gates, lengths), ("full decode", ms_full)


def _workload(op, shape, lif_impl="pallas_triton"):
  # lif_impl: the --implementation flag (lif and scan)
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
    op_fn = lambda cfg: lambda x: lif(x, implementation=lif_impl, config=cfg)[0]
    args, fwd_bytes, bwd_bytes = (x,), 2 * big + 2 * small, 3 * big + 2 * small
  else:
    from ops.scan import linear_scan
    a = jax.random.uniform(k[2], (b, t, c), jnp.float32, 0.9, 1.0).astype(dt)
    op_fn = lambda cfg: lambda a, x: linear_scan(a, x, implementation=lif_impl,
                                                 config=cfg)[0]
    args, fwd_bytes, bwd_bytes = (a, x), 3 * big + 2 * small, 5 * big + 2 * small

  return (lambda config: _vjp_fns(op_fn(config))), args, args + (g,), fwd_bytes, \
      fwd_bytes + bwd_bytes


def main(argv):
  del argv
  import jax
  from experiments.bench import timing
  op = _OP.value
  Config = _config_class(op)
  fields = {f.name for f in dataclasses.fields(Config)}
  grid = parse_grid(_GRID.value, fields)
  shape = parse_shape(_SHAPE.value, op)
  if jax.default_backend() != "gpu":
    raise app.UsageError("tune_ops times the Pallas Triton kernels: it needs a GPU")
  base = Config.for_device(jax.devices()[0].device_kind)
  if op == "nsa_decode":
    make_fns, a_f, (base_name, base_f) = _nsa_decode_workload(shape)
    a_fb = None
    ref = f"{base_name} {base_f * 1e3:.1f} us per step in a loop"
    ratio = lambda ms_f, ms_fb: (base_f / ms_f, None)
    cols = f"decode x {base_name} speed", "-"
    fmt = "{:.2f}x"
  elif op == "nsa":
    make_fns, a_f, a_fb, (base_name, base_f, base_fb) = _nsa_workload(shape)
    ref = f"{base_name} fwd {base_f:.3f} ms, fwd+bwd {base_fb:.3f} ms"
    ratio = lambda ms_f, ms_fb: (base_f / ms_f, base_fb / ms_fb)
    cols = f"fwd x {base_name} speed", f"fwd+bwd x {base_name} speed"
    fmt = "{:.2f}x"
  else:
    copy = [timing.copy_bandwidth_gbs()]
    make_fns, a_f, a_fb, nb_f, nb_fb = _workload(op, shape, _IMPL.value)
    ref = f"copy {copy[0]:.0f} GB/s"
    ratio = lambda ms_f, ms_fb: (nb_f / ms_f / 1e6 / max(copy), nb_fb / ms_fb / 1e6 / max(copy))
    cols = "fwd / copy", "fwd+bwd / copy"
    fmt = "{:.0%}"
  print(f"{jax.devices()[0].device_kind}; {ref}; base {base}", flush=True)

  def line(label, ms_f, ms_fb):
    r_f, r_fb = ratio(ms_f, ms_fb)
    if ms_fb is None:
      return f"| {label} | {ms_f:.4f} | {fmt.format(r_f)} | - | - | |"
    return (f"| {label} | {ms_f:.3f} | {fmt.format(r_f)} | {ms_fb:.3f} | {fmt.format(r_fb)} "
            "| |")

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
      if fwd_bwd is None:          # decode: per step inside one jitted loop, no backward
        ms_f, ms_fb = timing.time_in_loop(fwd, *a_f), None
      else:
        # back-to-back calls, as bench_ops times these ops: session 15's tgmm sweep ranked
        # two ~1.5 ms tiles in the opposite order with one synchronised call per timing
        ms_f = timing.time_pipelined(fwd, *a_f, calls=50, max_batch_s=0.3)
        ms_fb = timing.time_pipelined(fwd_bwd, *a_fb, calls=50, max_batch_s=0.3)
    except Exception as e:  # a config Triton cannot compile: report it and go on
      rows.append((float("inf"), f"| {label} | | | | | failed: {type(e).__name__}: "
                   f"{str(e)[:80]} |"))
      continue
    print(line(label, ms_f, ms_fb), flush=True)
    rows.append((ms_f if ms_fb is None else ms_fb, (label, ms_f, ms_fb)))
  if op not in ("nsa", "nsa_decode"):
    # the copy has measured 3348-3755 GB/s in different processes on one H200 kind: the table
    # is against the higher of this measurement and the one before the sweep
    copy.append(timing.copy_bandwidth_gbs())
    ref = f"copy {max(copy):.0f} GB/s, the higher of {copy[0]:.0f} before and {copy[1]:.0f} after"
  rows = [(key, line(*r) if isinstance(r, tuple) else r) for key, r in rows]
  first = "decode ms" if op == "nsa_decode" else "fwd ms"
  head = (f"### {op} {_SHAPE.value} ({ref})\n| config | {first} | {cols[0]} | fwd+bwd ms | "
          f"{cols[1]} | note |\n|---|---|---|---|---|---|")
  table = head + "\n" + "\n".join(line for _, line in sorted(rows, key=lambda r: r[0]))
  print(table)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
