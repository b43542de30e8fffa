"""Gated-LPI: neuron/head attribution of the log-probability increase over a checkpoint series,
concentration (top-1% share) and stability; MoE vs dense.

  python experiments/analyze_gated_lpi.py --preset=tiny --out_dir=/tmp/lpi
  python experiments/analyze_gated_lpi.py --runs=dense=runs/a,moe=runs/b --steps=0,1000,5000
Definitions: jaxlm/analysis/gated_lpi.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from experiments import analysis_runs

analysis_runs.define_flags(["dense", "moe", "unipool"])
_SERIES = flags.DEFINE_list("steps", [], "checkpoint steps of the series (default: all)")
_NSEQ = flags.DEFINE_integer("n_seqs", 8, "validation windows whose log-prob is attributed")
_IG = flags.DEFINE_integer("ig_steps", 8, "Riemann points of the path integral")
_FRAC = flags.DEFINE_float("frac", 0.01, "top fraction of neurons for the concentration")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxlm.analysis import common, gated_lpi
  runs = analysis_runs.resolve_runs()
  series = [int(s) for s in _SERIES.value] or None
  results = {label: gated_lpi.analyze_series(d, series, n_seqs=_NSEQ.value,
                                             ig_steps=_IG.value, frac=_FRAC.value)
             for label, d in runs.items()}
  rep = gated_lpi.report(results, analysis_runs.out_dir())
  common.finish(rep, analysis_runs.out_dir(), "gated_lpi", "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
