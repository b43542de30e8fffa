"""NSA vs full attention: two transformers of the same shape trained for the same steps.

  python experiments/ablate_nsa.py --preset=tiny --out_dir=runs/ablate_nsa        # CPU, minutes
  python experiments/ablate_nsa.py --preset=paper --steps=5000 --out_dir=/tmp/nsa1b  # accelerators

tiny: tiny_cpu vs tiny_nsa_cpu; paper: dense_1b vs nsa_1b (the paper's NSA structure on the
dense_1b shape; jaxlm/configs/nsa.py). Both runs see the same data in the same order (same
seed) through jaxlm.train.loop.Trainer, evaluated on the held-out split every --eval_every
steps. Writes to --out_dir: results.md (final val loss of
each, relative difference, NSA per-branch mean gates on the validation batches, per layer),
loss_curves.png (train loss per step and val loss), results.json, and each run's folder.
A run folder that already holds checkpoints is resumed (the val curve then starts there).
"""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

PAIRS = {"tiny": ("tiny_cpu", "tiny_nsa_cpu"), "paper": ("dense_1b", "nsa_1b")}
_PRESET = flags.DEFINE_enum("preset", "tiny", list(PAIRS), "model pair")
_STEPS = flags.DEFINE_integer("steps", 300, "optimizer steps of each run")
_EVAL = flags.DEFINE_integer("eval_every", 50, "val loss every this many steps")
_BATCH = flags.DEFINE_integer("batch_size", 0, "0 = the preset's")
_SEQ = flags.DEFINE_integer("seq_len", 0, "0 = the preset's")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "0 = the preset's")
_OUT = flags.DEFINE_string("out_dir", "runs/ablate_nsa", "output folder")
_SET = flags.DEFINE_multi_string("set", [], "override applied to both runs, repeatable: "
                                 "--set model.n_layers=2")


def run_config(name: str, out_dir: str, steps: int, eval_every: int, batch_size=0, seq_len=0,
               eval_batches=0, overrides=()):
  from jaxlm import configs
  from jaxlm.config import apply_overrides, validate
  cfg = apply_overrides(configs.get_preset(name), overrides)
  t = cfg.train
  t = dataclasses.replace(
      t, steps=steps, warmup_steps=min(t.warmup_steps, max(0, steps // 10)),
      eval_every=min(eval_every, steps), checkpoint_every=min(eval_every, steps),
      log_every=min(t.log_every, eval_every, steps), keep_checkpoints=1, async_checkpoint=False,
      batch_size=batch_size or t.batch_size, seq_len=seq_len or t.seq_len,
      eval_batches=eval_batches or t.eval_batches, output_dir=os.path.join(out_dir, name))
  return validate(dataclasses.replace(cfg, train=t))


def train_one(cfg, devices=None) -> dict:
  """Train (resuming if possible) in chunks of eval_every steps; returns curves and gates."""
  import jax
  import numpy as np
  from jaxlm.train.loop import Trainer
  trainer = Trainer(cfg, devices)
  t0, val = time.perf_counter(), []
  while True:
    res = trainer.run(stop_after=cfg.train.eval_every, progress=False)
    if res.val_loss is not None:
      val.append((res.final_step, res.val_loss))
    if res.final_step >= cfg.train.steps:
      break
  if not val or val[-1][0] != res.final_step:
    val.append((res.final_step, trainer.evaluate(trainer.state.params)["loss"]))
  train = {}
  with open(os.path.join(cfg.train.output_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      train[row["step"]] = row["loss"]  # a resumed run rewrites steps: keep the last
  gates = {}
  if cfg.model.attention.kind == "nsa":
    fwd = jax.jit(lambda p, x: trainer.fm.apply(p, x, return_aux=True)[2])
    auxes = [jax.device_get(fwd(trainer.state.params, b["inputs"])) for b in trainer.val_batches]
    gates = {k: np.mean([np.asarray(a[k]) for a in auxes], axis=0).tolist() for k in auxes[0]}
  trainer.close()
  return dict(name=cfg.name, params=trainer.fm.num_params(), val=val,
              train=sorted(train.items()), gates=gates, seconds=time.perf_counter() - t0)


def report(runs: list[dict], out_dir: str, steps: int) -> str:
  full, nsa = runs
  vf, vn = full["val"][-1][1], nsa["val"][-1][1]
  lines = [f"# NSA vs full attention ({steps} steps each, same data order)", "",
           "| model | params | final val loss | val ppl | train s |", "|---|---|---|---|---|"]
  import math
  for r in runs:
    v = r["val"][-1][1]
    lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {v:.4f} | {math.exp(v):.2f} | "
                 f"{r['seconds']:.0f} |")
  lines += ["", f"relative difference (nsa - full) / full: {100 * (vn - vf) / vf:+.2f}%", ""]
  g = nsa["gates"]
  if g:
    lines += ["NSA mean gate per branch on the validation batches (sigmoid, init 0.5):", "",
              "| layer | compressed | selected | window |", "|---|---|---|---|"]
    for i, (c, s, w) in enumerate(zip(g["layer_gate_cmp"], g["layer_gate_slc"],
                                      g["layer_gate_win"])):
      lines.append(f"| {i} | {c:.3f} | {s:.3f} | {w:.3f} |")
    lines.append(f"| mean | {g['gate_cmp']:.3f} | {g['gate_slc']:.3f} | {g['gate_win']:.3f} |")
  lines += ["", "val loss by step:", "", "| step | " + " | ".join(r["name"] for r in runs) + " |",
            "|---|---|---|"]
  by_step = [dict(r["val"]) for r in runs]
  for s in sorted(set().union(*by_step)):
    lines.append(f"| {s} | " + " | ".join(f"{v[s]:.4f}" if s in v else "" for v in by_step) + " |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(runs, f, indent=1)
  return text


def plot(runs: list[dict], out_dir: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r, color in zip(runs, ("tab:blue", "tab:orange")):
    steps, loss = np.array(r["train"]).T if r["train"] else (np.zeros(0), np.zeros(0))
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) >= k else loss
    ax.plot(steps[k - 1:], smooth, color=color, alpha=0.6, label=f"{r['name']} train")
    vs, vl = np.array(r["val"]).T
    ax.plot(vs, vl, "o-", color=color, label=f"{r['name']} val")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  path = os.path.join(out_dir, "loss_curves.png")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def run_ablation(preset: str, out_dir: str, steps: int, eval_every: int, devices=None,
                 **train) -> str:
  """Both runs, then results.md / results.json / loss_curves.png; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  runs = [train_one(run_config(n, out_dir, steps, eval_every, **train), devices)
          for n in PAIRS[preset]]
  text = report(runs, out_dir, steps)
  plot(runs, out_dir)
  return text


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  print(run_ablation(_PRESET.value, _OUT.value, _STEPS.value, _EVAL.value,
                     batch_size=_BATCH.value, seq_len=_SEQ.value,
                     eval_batches=_EVAL_BATCHES.value, overrides=tuple(_SET.value)))


if __name__ == "__main__":
  app.run(main)
