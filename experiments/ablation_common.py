"""Shared pieces of the experiments/ablate_*.py scripts.

  train_variant(cfg, ...)   trains one config from scratch with the Trainer's own data, jitted
                            train step and evaluation, and returns a `Curve`: per-step train
                            loss, validation loss at fixed intervals, the aux metrics (MoE
                            routing / spike statistics) averaged over the last steps, measured
                            tokens/s (compile excluded) and parameter counts.
  markdown_table / write_results / plot_curves / plot_bars   the outputs (results.md + PNGs,
                            matplotlib's Agg backend; small figures so that committed PNGs stay
                            well under 200 KB).
  add_common_flags          --preset, --steps, --out_dir, --eval_every, --eval_batches, --seed,
                            --set (overrides applied to every variant).

Every script maps `--preset=tiny` to the CPU-sized presets and `--preset=paper` to the papers'
presets; the code path is the same, only the numbers differ.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Iterable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from jaxlm import config as config_lib
from jaxlm.config import Config


def add_common_flags(flags, default_steps: int, default_out: str):
  """Define the flags every ablation script shares (call at import time)."""
  flags.DEFINE_enum("preset", "tiny", ["tiny", "paper"],
                    "tiny: CPU-sized models (minutes); paper: the papers' model sizes")
  flags.DEFINE_integer("steps", default_steps, "training steps per variant (0 = the preset's)")
  flags.DEFINE_string("out_dir", default_out, "where results.md, the PNGs and runs/ go")
  flags.DEFINE_integer("eval_every", 0, "validation interval in steps (0 = about 8 points)")
  flags.DEFINE_integer("eval_batches", 0, "validation batches (0 = the preset's)")
  flags.DEFINE_integer("batch_size", 0, "global batch size (0 = the preset's)")
  flags.DEFINE_integer("seq_len", 0, "sequence length (0 = the preset's)")
  flags.DEFINE_integer("seed", 0, "training seed of every variant")
  flags.DEFINE_multi_string("set", [], "section.field=value override applied to every variant")
  flags.DEFINE_bool("reuse", False, "reuse finished variants' out_dir/runs/<name>/curve.json "
                    "(same steps) instead of training them again")


def with_train(cfg: Config, flag_values, out_dir: str) -> Config:
  """Apply the common flags (steps, batch, seq, eval batches, seed, --set) to one variant."""
  t = cfg.train
  steps = flag_values.steps or t.steps
  changes = dict(steps=steps, seed=flag_values.seed, output_dir=out_dir,
                 warmup_steps=min(t.warmup_steps, max(steps // 10, 0)),
                 checkpoint_every=max(steps, 1), eval_every=max(steps, 1), async_checkpoint=False)
  if flag_values.eval_batches:
    changes["eval_batches"] = flag_values.eval_batches
  if flag_values.batch_size:
    changes["batch_size"] = flag_values.batch_size
  if flag_values.seq_len:
    changes["seq_len"] = flag_values.seq_len
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, **changes))
  return config_lib.apply_overrides(cfg, flag_values.set)


def replace_moe(cfg: Config, name: str, **moe) -> Config:
  m = cfg.model
  return dataclasses.replace(cfg, name=name, model=dataclasses.replace(
      m, moe=dataclasses.replace(m.moe, **moe)))


def replace_spiking(cfg: Config, name: str, **spiking) -> Config:
  m = cfg.model
  return dataclasses.replace(cfg, name=name, model=dataclasses.replace(
      m, spiking=dataclasses.replace(m.spiking, **spiking)))


# --------------------------------------------------------------------------- MoE configs

def tiny_moe_base():
  """CPU-sized MoE transformer of the ablations: 4 layers, d_model 64, expert width 128,
  batch 8 x 64 tokens (ops.gmm on CPU computes every expert densely, so it stays small)."""
  from jaxlm.configs import get_preset
  base = get_preset("tiny_unipool_cpu")
  m = dataclasses.replace(base.model, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)
  t = dataclasses.replace(base.train, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=30)
  return dataclasses.replace(base, model=m, train=t)


def unipool_variants(preset: str, size: str, multipliers, fine: bool) -> list:
  """Experiment 1's configs (experiments/ablate_unipool.py docstring); the first is the
  vanilla baseline. tiny: 3 experts per layer, so 50% / 66.7% pools are exactly 6 / 8."""
  from jaxlm.configs import get_preset
  if preset == "tiny":
    base = tiny_moe_base()
    per_layer = 3
    vanilla = replace_moe(base, "vanilla", kind="vanilla", n_experts=per_layer, top_k=1,
                          router="softmax_topk", renormalize=False, balance_loss=1e-2,
                          pool_balance_loss=0.0)
    pool_loss = 1e-2
  else:
    vanilla = dataclasses.replace(get_preset(f"vanilla_moe_{size}"), name="vanilla")
    base = get_preset(f"unipool_{size}")
    per_layer = vanilla.model.moe.n_experts
    pool_loss = base.model.moe.pool_balance_loss
  n_layers = vanilla.model.n_layers
  budget = per_layer * n_layers

  def unipool(name, m, **kw):
    return replace_moe(vanilla, name, kind="unipool", n_experts=m, n_groups=1,
                       router="norm_router", balance_loss=0.0, pool_balance_loss=pool_loss, **kw)

  out = [vanilla, unipool("unipool_100", budget)]
  sizes = {budget}
  for frac, label in ((2 / 3, "66.7"), (0.5, "50")):
    m = int(round(budget * frac))
    out.append(unipool(f"unipool_{label}", m))
    sizes.add(m)
  for mult in multipliers:
    m = int(round(float(mult) * n_layers))
    if m not in sizes and m >= 1:
      out.append(unipool(f"unipool_M{m}", m))
      sizes.add(m)
  if fine:
    d_expert = vanilla.model.resolved_d_expert // 2
    out.append(unipool("unipool_fine", 2 * budget, d_expert=d_expert, top_k=2))
  return out


# --------------------------------------------------------------------------- parameters

def param_counts(cfg: Config) -> dict:
  """Total params, FFN-expert params and params active per token (top-k of the experts)."""
  import jax
  from jaxlm.models import build
  fm = build(cfg.model)
  shapes = fm.param_shapes
  total = sum(int(x.size) for x in jax.tree.leaves(shapes))
  m = cfg.model
  out = {"total": total, "experts": 0, "active": total}
  if m.kind == "transformer" and m.moe.kind != "none":
    pool = shapes["pool"]
    expert = sum(int(pool[n].size) for n in ("w_gate", "w_up", "w_down"))
    per_expert = expert // (m.n_pools * m.moe.n_experts)
    out["experts"] = expert
    out["active"] = total - expert + m.n_layers * min(m.moe.top_k, m.moe.n_experts) * per_expert
  return out


# --------------------------------------------------------------------------- training

@dataclasses.dataclass
class Curve:
  name: str
  cfg: Config
  train_steps: list[int]
  train_loss: list[float]
  val_steps: list[int]
  val_loss: list[float]
  aux: dict                    # mean of every metric over the last `aux_window` steps
  tokens_per_s: float          # training tokens/s after the first (compiling) steps
  eval_tokens_per_s: float     # forward-only tokens/s of the validation pass
  seconds: float
  params: dict
  val_aux: dict = dataclasses.field(default_factory=dict)  # aux + accuracy on validation data
  state: object = None         # final TrainState (kept only when asked)

  @property
  def final_val(self) -> float:
    return self.val_loss[-1]

  @property
  def final_ppl(self) -> float:
    return math.exp(min(self.final_val, 50.0))

  def summary(self) -> dict:
    return {"name": self.name, "final_val_loss": self.final_val, "final_ppl": self.final_ppl,
            "val_steps": self.val_steps, "val_loss": self.val_loss,
            "tokens_per_s": self.tokens_per_s, "eval_tokens_per_s": self.eval_tokens_per_s,
            "seconds": self.seconds, "params": self.params,
            "aux": {k: v for k, v in self.aux.items() if np.ndim(v) == 0},
            "val_aux": self.val_aux, "train_steps": self.train_steps,
            "train_loss": self.train_loss}


def _eval_points(steps: int, eval_every: int) -> list[int]:
  every = eval_every or max(1, steps // 8)
  pts = list(range(every, steps + 1, every))
  if not pts or pts[-1] != steps:
    pts.append(steps)
  return pts


def eval_forward(fm, params, batches, route_override=None) -> dict:
  """Token-weighted validation loss, next-token accuracy and the model's aux values (named as
  in the train metrics, moe/<name> or spiking/<name>, per-layer ones as `<name>/i`) of
  `params` over host batches (single process, jitted once per model)."""
  import jax
  import jax.numpy as jnp
  from jaxlm.train.step import aux_prefix

  prefix = aux_prefix(fm.cfg)
  fn = _eval_fn(fm, prefix is not None, route_override is not None)
  sums, n = {}, 0.0
  for b in batches:
    args = (params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
            jnp.asarray(b["loss_mask"]) if "loss_mask" in b else None)
    out = jax.device_get(fn(*args, route_override) if route_override is not None else fn(*args))
    w = float(out.pop("tokens"))
    for k, v in out.items():
      if k not in ("loss", "accuracy"):
        k = prefix + k  # the train metrics' names: moe/..., spiking/...
      sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64) * w
    n += w
  res = {}
  for k, v in sums.items():
    v = v / max(n, 1.0)
    if v.ndim == 0:
      res[k] = float(v)
    else:
      res.update({f"{k}/{i}": float(x) for i, x in enumerate(v.ravel())})
  res["perplexity"] = math.exp(min(res["loss"], 50.0))
  res["tokens"] = n
  return res


_EVAL_FNS: dict = {}


def _eval_fn(fm, has_aux: bool, with_override: bool):
  import jax
  import jax.numpy as jnp
  import optax

  key = (id(fm), has_aux, with_override)
  if key in _EVAL_FNS:
    return _EVAL_FNS[key][1]

  def f(params, inputs, targets, mask, route_override=None):
    kw = {"return_aux": True} if has_aux else {}
    if route_override is not None:
      kw["route_override"] = route_override
    out = fm.apply(params, inputs, **kw)
    logits = out[0]
    m = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    res = {"loss": jnp.sum(ce * m) / n, "accuracy": jnp.sum(acc * m) / n, "tokens": jnp.sum(m)}
    if has_aux:
      res.update({k: v for k, v in out[2].items()})
    return res

  jf = jax.jit(f)
  _EVAL_FNS[key] = (fm, jf)  # keep fm alive so its id is not reused
  return jf


def train_variant(cfg: Config, *, eval_every: int = 0, aux_window: int = 20,
                  keep_state: bool = False, save_checkpoint: bool = False,
                  fresh: bool = True, log=print) -> Curve:
  """Train cfg from scratch for cfg.train.steps steps (see module docstring). Validation
  (eval_forward: loss, accuracy, aux statistics) runs at ~8 evenly spaced steps and the last;
  single-process runs only (the ablations are single-host studies)."""
  import jax
  from jaxlm import sharding
  from jaxlm.train.loop import Trainer, to_global, window_means
  from jaxlm.train.state import init_state

  t = cfg.train
  if fresh and os.path.isdir(t.output_dir):
    shutil.rmtree(t.output_dir)
  os.makedirs(t.output_dir, exist_ok=True)
  t0 = time.perf_counter()
  trainer = Trainer(cfg)
  state = init_state(trainer.fm, trainer.tx, t.seed, trainer.mesh)
  evals = set(_eval_points(t.steps, eval_every))
  train_steps, train_loss, val_steps, val_loss, recent = [], [], [], [], []
  timed_tokens, timed_s, eval_tok, eval_s = 0.0, 0.0, 0.0, 0.0
  warm = min(3, max(t.steps - 1, 0))  # steps excluded from the throughput (compilation)
  with sharding.use_mesh(trainer.mesh):
    for step in range(t.steps):
      batch = to_global(next(trainer.train_iter), trainer.mesh)
      ts = time.perf_counter()
      state, m = trainer.step_fn(state, batch)
      m = jax.device_get(m)
      dt = time.perf_counter() - ts
      if step >= warm:
        timed_tokens += float(m["tokens"])
        timed_s += dt
      train_steps.append(step + 1)
      train_loss.append(float(m["loss"]))
      recent.append(m)
      recent = recent[-aux_window:]
      if step + 1 in evals:
        te = time.perf_counter()
        ev = eval_forward(trainer.fm, state.params, trainer.val_batches)
        if step + 1 != min(evals):  # the first evaluation compiles
          eval_s += time.perf_counter() - te
          eval_tok += ev["tokens"]
        val_steps.append(step + 1)
        val_loss.append(float(ev["loss"]))
        val_aux = ev
        log(f"  {cfg.name}: step {step + 1}/{t.steps} train {np.mean(train_loss[-10:]):.4f} "
            f"val {ev['loss']:.4f}")
    if save_checkpoint:
      trainer.save(state)
      trainer.ckpt.wait()
  trainer.close()
  aux = window_means(recent)
  aux.pop("nonfinite", None)
  if eval_tok == 0:  # a single evaluation: time one more pass (compiled now)
    te = time.perf_counter()
    eval_forward(trainer.fm, state.params, trainer.val_batches)
    eval_s, eval_tok = time.perf_counter() - te, val_aux["tokens"]
  curve = Curve(cfg.name, cfg, train_steps, train_loss, val_steps, val_loss, aux,
                timed_tokens / max(timed_s, 1e-9), eval_tok / max(eval_s, 1e-9),
                time.perf_counter() - t0, param_counts(cfg), val_aux,
                state if keep_state else None)
  os.makedirs(t.output_dir, exist_ok=True)
  with open(os.path.join(t.output_dir, "curve.json"), "w") as f:
    json.dump(curve.summary(), f, indent=1)
  return curve


def load_curve(cfg: Config) -> Curve | None:
  """The Curve a previous train_variant wrote to cfg.train.output_dir/curve.json (None if
  absent or for another number of steps); curve.json files without the train curve give
  empty train lists (plots then show the validation points only)."""
  path = os.path.join(cfg.train.output_dir, "curve.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    d = json.load(f)
  if not d["val_steps"] or d["val_steps"][-1] != cfg.train.steps:
    return None
  return Curve(cfg.name, cfg, d.get("train_steps", []), d.get("train_loss", []), d["val_steps"],
               d["val_loss"], d["aux"], d["tokens_per_s"], d["eval_tokens_per_s"], d["seconds"],
               d["params"], d.get("val_aux", {}))


def train_or_load(cfg: Config, reuse: bool, **kw) -> Curve:
  """train_variant, or (reuse) the curve of a finished earlier run of the same variant."""
  if reuse:
    c = load_curve(cfg)
    if c is not None:
      print(f"  {cfg.name}: reusing {cfg.train.output_dir}/curve.json")
      return c
  return train_variant(cfg, **kw)


def train_all(cfgs: Sequence[Config], **kw) -> list[Curve]:
  out = []
  for cfg in cfgs:
    out.append(train_variant(cfg, **kw))
  return out


# --------------------------------------------------------------------------- outputs

def fmt(v, digits: int = 4) -> str:
  if v is None:
    return "–"
  if isinstance(v, str):
    return v
  if isinstance(v, (int, np.integer)):
    return f"{int(v):,}"
  if not math.isfinite(v):
    return str(v)
  if abs(v) >= 1e5:
    return f"{v:,.0f}"
  return f"{v:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
  return "\n".join(lines)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  v = np.asarray(values, np.float64)
  if window <= 1 or len(v) < window:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate([head, (c[window:] - c[:-window]) / window])


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_curves(curves: Sequence[Curve], path: str, title: str, smooth_window: int = 10,
                perplexity: bool = False):
  """Train (smoothed, thin) and validation (markers) loss of several variants in one PNG."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
  for i, c in enumerate(curves):
    color = f"C{i % 10}"
    tr = smooth(c.train_loss, smooth_window)
    va = np.asarray(c.val_loss)
    if perplexity:
      tr, va = np.exp(np.minimum(tr, 50)), np.exp(np.minimum(va, 50))
    ax.plot(c.train_steps, tr, color=color, alpha=0.35, lw=1)
    ax.plot(c.val_steps, va, color=color, marker="o", ms=3, lw=1.5, label=c.name)
  ax.set_xlabel("step")
  ax.set_ylabel("perplexity" if perplexity else "loss")
  ax.set_title(title + " (thin: train, smoothed; markers: validation)", fontsize=9)
  if perplexity:
    ax.set_yscale("log")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  # zoom on the second half of training, where the variants separate
  vals = [v for c in curves for v in (np.exp(c.val_loss) if perplexity else c.val_loss)]
  if vals:
    lo, hi = min(vals), max(v for c in curves
                            for v in (np.exp(c.val_loss[len(c.val_loss) // 2:]) if perplexity
                                      else c.val_loss[len(c.val_loss) // 2:]))
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + 6 * pad)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str, title: str,
              ylabel: str, errors: Sequence[float] | None = None, baseline: float | None = None):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
  x = np.arange(len(labels))
  ax.bar(x, values, yerr=errors, color=[f"C{i % 10}" for i in range(len(labels))], capsize=3)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  if baseline is not None:
    ax.axhline(baseline, color="k", lw=0.8, ls="--")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_xy(series: dict, path: str, title: str, xlabel: str, ylabel: str, logx: bool = False):
  """series: label -> (xs, ys)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=90)
  for i, (label, (xs, ys)) in enumerate(series.items()):
    ax.plot(xs, ys, marker="o", ms=4, color=f"C{i % 10}", label=label)
  if logx:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_results(out_dir: str, title: str, sections: Sequence[tuple[str, str]],
                  command: str, data: dict | None = None) -> str:
  """results.md: a title, the command, then (heading, markdown) sections; results.json too."""
  os.makedirs(out_dir, exist_ok=True)
  parts = [f"# {title}", "", f"Command: `{command}`", ""]
  for heading, body in sections:
    parts += [f"## {heading}", "", body.rstrip(), ""]
  path = os.path.join(out_dir, "results.md")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  if data is not None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(data, f, indent=1, default=float)
  return path


def command_line() -> str:
  return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
