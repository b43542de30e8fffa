"""Experiment 1: UniPool vs vanilla MoE at matched active parameters (arXiv 2605.06665).

Variants (all top-1 except the fine-grained one, so every variant has the same active params):
  vanilla          E experts per layer, softmax top-1 (gate = probability), per-layer balance 1e-2
  unipool_100      one pool of M = E*L experts shared by all layers (same total expert params),
                   NormRouter top-1, pool-level balance loss
  unipool_66.7 / unipool_50   reduced pools (66.7% / 50% of vanilla's expert parameter budget)
  unipool_M<m>     pool-size sweep M = m*L (depth-scaling knob; shares runs with the above)
  unipool_fine     finer-grained experts: 2M experts of half width, top-2 (same total and active
                   params as unipool_100)
Outputs (out_dir): results.md, results.json, loss_curves.png, pool_sweep.png, runs/<variant>/.

  python experiments/ablate_unipool.py --preset=tiny --steps=300 --out_dir=/tmp/ablate_unipool
  python experiments/ablate_unipool.py --preset=paper --size=182m --out_dir=runs/ablate_unipool

--preset=paper uses jaxlm/configs/moe.py's vanilla_moe_<size> / unipool_<size> (8 experts per
layer, M = 8L, pool loss 1e-2 at 182M, 2e-2 above) with the same code; use --set to point
data.source at real shards and --steps to shorten.
--preset=tiny: 4 layers, d_model 64, expert width 128, 3 experts per layer (budget 12 experts,
so 50% / 66.7% pools are exactly 6 / 8 experts), batch 8 x 64 tokens. Expert width and batch
are small because ops.gmm on CPU computes every expert densely (cost grows with the pool size).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import ablation_common as ac

ac.add_common_flags(flags, default_steps=300, default_out="runs/ablate_unipool")
_SIZE = flags.DEFINE_string("size", "182m", "--preset=paper: model size (182m, 469m, ...)")
_SWEEP = flags.DEFINE_list("pool_multipliers", ["1", "4"],
                           "pool-size sweep: M = m * n_layers for each m (besides 50/66.7/100%)")
_FINE = flags.DEFINE_bool("fine_grained", True, "add the finer-grained UniPool variant")
_ONLY = flags.DEFINE_list("only", [], "run only these variant names (tests)")


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  cfgs = ac.unipool_variants(f.preset, _SIZE.value, _SWEEP.value, _FINE.value)
  if _ONLY.value:
    cfgs = [c for c in cfgs if c.name in _ONLY.value]
  runs = os.path.join(f.out_dir, "runs")
  cfgs = [ac.with_train(c, f, os.path.join(runs, c.name)) for c in cfgs]
  keep = {"vanilla", "unipool_100"}
  curves = [ac.train_or_load(c, f.reuse, eval_every=f.eval_every,
                             save_checkpoint=c.name in keep) for c in cfgs]
  write(curves, f.out_dir)


def pool_pct(c, budget: int) -> float:
  m = c.cfg.model
  if m.moe.kind == "vanilla":
    return 100.0
  return 100.0 * m.moe.n_experts * m.resolved_d_expert / (budget * c.cfg.model.d_ff)


def write(curves, out_dir: str):
  os.makedirs(out_dir, exist_ok=True)
  van = next((c for c in curves if c.name == "vanilla"), None)
  vm = (van or curves[0]).cfg.model
  budget = (vm.moe.n_experts * vm.n_layers) if vm.moe.kind == "vanilla" else vm.moe.n_experts
  rows = []
  for c in curves:
    m = c.cfg.model
    rows.append([c.name, m.moe.kind, m.moe.n_experts if m.moe.kind == "unipool" else
                 f"{m.moe.n_experts}/layer", m.moe.top_k, m.resolved_d_expert,
                 f"{pool_pct(c, budget):.1f}%", c.params["total"], c.params["active"],
                 c.final_val, c.final_ppl,
                 None if van is None else c.final_val - van.final_val,
                 c.val_aux.get("accuracy"), c.aux.get("moe/pool_load_max_ratio"),
                 c.tokens_per_s])
  table = ac.markdown_table(
      ["variant", "kind", "experts", "top-k", "expert width", "expert params vs vanilla",
       "total params", "active params", "val loss", "val ppl", "Δ vs vanilla", "val acc",
       "max load / uniform (train)", "train tok/s"], rows)
  ac.plot_curves(curves, os.path.join(out_dir, "loss_curves.png"),
                 "UniPool vs vanilla MoE")
  sweep = sorted((c.cfg.model.moe.n_experts, c.final_val) for c in curves
                 if c.cfg.model.moe.kind == "unipool" and c.cfg.model.moe.top_k == 1)
  series = {"UniPool top-1 (pool size M)": ([s[0] for s in sweep], [s[1] for s in sweep])}
  if van is not None:
    series[f"vanilla ({budget} experts in total)"] = ([budget], [van.final_val])
  fine = [c for c in curves if c.name == "unipool_fine"]
  if fine:
    series["UniPool fine-grained (2M half-width, top-2)"] = (
        [fine[0].cfg.model.moe.n_experts // 2], [fine[0].final_val])
  ac.plot_xy(series, os.path.join(out_dir, "pool_sweep.png"),
             "final validation loss vs pool size", "M (full-width-equivalent experts)",
             "val loss", logx=True)
  sections = [("Final validation loss", table),
               ("Plots", "loss_curves.png (train/val curves), pool_sweep.png (final val loss vs "
                "pool size)")]
  ac.write_results(out_dir, "UniPool vs vanilla MoE", sections, ac.command_line(),
                   {"curves": [c.summary() for c in curves]})
  print(table)


if __name__ == "__main__":
  app.run(main)
