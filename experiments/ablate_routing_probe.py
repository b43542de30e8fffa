"""Experiment 2: routing probe (UniPool paper, arXiv 2605.06665).

Replace the learned router of one MoE layer with uniform random routing at evaluation time (for
each layer in turn) and report the change of validation loss and next-token accuracy. Random
routing draws, per token, top-k experts uniformly without replacement from the layer's router
outputs and keeps the learned gate values (jaxlm/layers/moe.py `random_route`, reached through
`model(..., route_override={"layer": l, "key": k})`), so only *which* experts run changes.
Each layer is probed with --draws independent random draws; the table gives their mean.

  # train the tiny vanilla MoE and UniPool first (CPU, minutes), then probe them
  python experiments/ablate_routing_probe.py --preset=tiny --steps=300 --out_dir=/tmp/probe
  # probe existing runs (train.output_dir folders holding checkpoints/), e.g. from
  # experiments/ablate_unipool.py or experiments/train.py --config=unipool_182m
  python experiments/ablate_routing_probe.py --run_dirs=runs/ablate_unipool/runs/vanilla,runs/ablate_unipool/runs/unipool_100

--preset=paper trains vanilla_moe_<size> and unipool_<size> (use --run_dirs for real runs).
The paper averages downstream-task accuracy over the deep-half layers; here the per-layer
validation loss/accuracy change is reported and the deep-half mean is given separately.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import ablation_common as ac

ac.add_common_flags(flags, default_steps=300, default_out="runs/ablate_routing_probe")
_RUNS = flags.DEFINE_list("run_dirs", [], "trained runs to probe (default: train them)")
_SIZE = flags.DEFINE_string("size", "182m", "--preset=paper: model size")
_DRAWS = flags.DEFINE_integer("draws", 2, "random routing draws per layer")


def probe(name: str, fm, params, batches, draws: int, seed: int = 0) -> dict:
  """Baseline and per-layer random-routing validation metrics of one model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  base = ac.eval_forward(fm, params, batches)
  layers = []
  for layer in range(fm.cfg.n_layers):
    losses, accs = [], []
    for d in range(draws):
      ov = {"layer": jnp.int32(layer), "key": jax.random.key(seed * 1000 + d)}
      r = ac.eval_forward(fm, params, batches, route_override=ov)
      losses.append(r["loss"])
      accs.append(r["accuracy"])
    layers.append({"layer": layer, "loss": float(np.mean(losses)),
                   "accuracy": float(np.mean(accs)),
                   "d_loss": float(np.mean(losses) - base["loss"]),
                   "d_loss_std": float(np.std(np.asarray(losses) - base["loss"])),
                   "d_acc": float(np.mean(accs) - base["accuracy"])})
  n = fm.cfg.n_layers
  deep = layers[n // 2:]
  return {"name": name, "base_loss": base["loss"], "base_accuracy": base["accuracy"],
          "layers": layers,
          "mean_d_loss": float(np.mean([l["d_loss"] for l in layers])),
          "mean_d_acc": float(np.mean([l["d_acc"] for l in layers])),
          "deep_mean_d_loss": float(np.mean([l["d_loss"] for l in deep])),
          "deep_mean_d_acc": float(np.mean([l["d_acc"] for l in deep]))}


def trained_models(f):
  """[(name, fm, params, val batches)] from --run_dirs or by training."""
  from jaxlm.data import make_val_batches
  out = []
  if _RUNS.value:
    from jaxlm.train.restore import load_run
    for d in _RUNS.value:
      run = load_run(d)
      t = run.cfg.train
      batches = make_val_batches(run.cfg.data, tokenizer=run.tokenizer, seq_len=t.seq_len,
                                 batch_size=t.batch_size,
                                 max_batches=f.eval_batches or t.eval_batches)
      out.append((os.path.basename(os.path.normpath(d)), run.fm, run.params, list(batches)))
    return out
  cfgs = [c for c in ac.unipool_variants(f.preset, _SIZE.value, [], False)
          if c.name in ("vanilla", "unipool_100")]
  from jaxlm.data import get_tokenizer
  for c in cfgs:
    c = ac.with_train(c, f, os.path.join(f.out_dir, "runs", c.name))
    curve = ac.train_variant(c, eval_every=f.eval_every, keep_state=True, save_checkpoint=True)
    from jaxlm.models import build
    t = c.train
    batches = make_val_batches(c.data, tokenizer=get_tokenizer(c.data, c.model.vocab_size),
                               seq_len=t.seq_len, batch_size=t.batch_size,
                               max_batches=t.eval_batches)
    out.append((c.name, build(c.model), curve.state.params, list(batches)))
  return out


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  results = [probe(name, fm, params, batches, _DRAWS.value, f.seed)
             for name, fm, params, batches in trained_models(f)]
  write(results, f.out_dir, _DRAWS.value)


def write(results, out_dir: str, draws: int):
  import numpy as np
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for r in results:
    rows.append([r["name"], "none (learned)", r["base_loss"], r["base_accuracy"], 0.0, None, 0.0])
    for l in r["layers"]:
      rows.append([r["name"], str(l["layer"]), l["loss"], l["accuracy"], l["d_loss"],
                   l["d_loss_std"], 100 * l["d_acc"]])
  table = ac.markdown_table(["model", "random layer", "val loss", "val acc", "Δ loss",
                             f"Δ loss std ({draws} draws)", "Δ acc (points)"], rows)
  summary = ac.markdown_table(
      ["model", "learned val loss", "learned acc", "mean Δ loss (all layers)",
       "mean Δ acc pts (all)", "mean Δ loss (deep half)", "mean Δ acc pts (deep half)"],
      [[r["name"], r["base_loss"], r["base_accuracy"], r["mean_d_loss"],
        100 * r["mean_d_acc"], r["deep_mean_d_loss"], 100 * r["deep_mean_d_acc"]]
       for r in results])
  plt = ac._plt()
  fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4), dpi=90)
  n = max(len(r["layers"]) for r in results)
  w = 0.8 / max(len(results), 1)
  for i, r in enumerate(results):
    x = np.arange(len(r["layers"])) + i * w
    axes[0].bar(x, [l["d_loss"] for l in r["layers"]], w, label=r["name"], color=f"C{i}",
                yerr=[l["d_loss_std"] for l in r["layers"]], capsize=2)
    axes[1].bar(x, [100 * l["d_acc"] for l in r["layers"]], w, label=r["name"], color=f"C{i}")
  for ax, yl in zip(axes, ("Δ val loss", "Δ next-token acc (points)")):
    ax.set_xticks(np.arange(n) + 0.4 - w / 2)
    ax.set_xticklabels([str(i) for i in range(n)])
    ax.set_xlabel("layer routed at random")
    ax.set_ylabel(yl)
    ax.axhline(0, color="k", lw=0.6)
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=7)
  fig.suptitle("routing probe: one layer's router replaced by uniform random routing",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "routing_probe.png"))
  plt.close(fig)
  ac.write_results(out_dir, "Routing probe", [("Summary", summary), ("Per layer", table),
                                               ("Plots", "routing_probe.png")],
                   ac.command_line(), {"results": results})
  print(summary)
  print(table)


if __name__ == "__main__":
  app.run(main)
