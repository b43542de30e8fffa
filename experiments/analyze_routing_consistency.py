"""Routing consistency (moe-lrc): SRP over segment lengths and SCH over cache sizes, per layer.

  python experiments/analyze_routing_consistency.py --preset=tiny --out_dir=/tmp/lrc
  python experiments/analyze_routing_consistency.py --runs=unipool=runs/unipool_182m --n_seqs=64
Definitions: jaxlm/analysis/routing_consistency.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from experiments import analysis_runs

analysis_runs.define_flags(["moe", "unipool"], "trained MoE runs")
_NSEQ = flags.DEFINE_integer("n_seqs", 16, "validation windows traced")
_SEG = flags.DEFINE_list("segments", ["4", "16", "64"], "segment lengths m")
_CAP = flags.DEFINE_list("capacities", [], "cache sizes C (default k, 2k, 4k)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import numpy as np
  from jaxlm.analysis import common
  from jaxlm.analysis import routing_consistency as rc
  runs = analysis_runs.resolve_runs()
  md, figs = [], []
  fig, axes = common.new_figure(2)
  for label, run_dir in runs.items():
    run = common.load(run_dir)
    moe = run.fm.cfg.moe
    batch = common.val_tokens(run, _NSEQ.value)
    trace = rc.routing_trace(run.fm, run.params, batch["inputs"])
    caps = [int(c) for c in _CAP.value] or None
    segs = [int(m) for m in _SEG.value]
    res = rc.analyze(trace, moe.n_routed, moe.top_k, segs, caps)
    rnd = rc.analyze(rc.random_trace_baseline(trace, moe.n_routed), moe.n_routed, moe.top_k,
                     segs, caps)
    md += [f"### {label} ({moe.kind}, {moe.n_routed} experts, top-{moe.top_k}, step {run.step})\n",
           rc.report(res, label), rc.report(rnd, f"{label} random-routing baseline")]
    axes[0].plot(segs, [np.nanmean(res["srp"][m]) for m in segs], marker="o", label=label)
    axes[0].plot(segs, [np.nanmean(rnd["srp"][m]) for m in segs], ls="--", label=f"{label} random")
    cs = res["capacities"]
    axes[1].plot(cs, [np.nanmean(res["sch"][(segs[-1], c)]) for c in cs], marker="o",
                 label=f"{label} SCH m={segs[-1]}")
    axes[1].plot(cs, [np.nanmean(res["lru"][c]) for c in cs], ls=":", label=f"{label} LRU")
  axes[0].set_xscale("log")
  axes[0].set_xlabel("segment length m")
  axes[0].set_ylabel("SRP (mean over layers)")
  axes[1].set_xlabel("cache size C")
  axes[1].set_ylabel("hit rate (mean over layers)")
  for ax in axes:
    ax.legend(fontsize=7)
  figs.append(common.save_figure(fig, analysis_runs.out_dir(), "routing_consistency.png"))
  common.finish(common.Report("\n".join(md), figs, {}), analysis_runs.out_dir(), "routing_consistency",
                "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
