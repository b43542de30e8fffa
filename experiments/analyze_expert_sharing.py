"""DES-Seq / DES-Vote expert sharing for block decoding: unique experts vs quality kept.

  python experiments/analyze_expert_sharing.py --preset=tiny --out_dir=/tmp/des
  python experiments/analyze_expert_sharing.py --runs=moe=runs/x --blocks=8,32,0
Definitions: jaxlm/analysis/expert_sharing.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from experiments import analysis_runs

analysis_runs.define_flags(["moe_top2", "unipool"], "trained MoE runs")
_NSEQ = flags.DEFINE_integer("n_seqs", 16, "validation windows")
_BLOCKS = flags.DEFINE_list("blocks", ["8", "0"], "block sizes (0 = whole sequence)")
_KP = flags.DEFINE_list("k_primes", [], "DES-Seq k' values (default 1 and K-1)")
_BETAS = flags.DEFINE_list("betas", ["0.15", "0.25", "0.5"], "DES-Vote kept fractions")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxlm.analysis import common, expert_sharing
  runs = analysis_runs.resolve_runs()
  results = {label: expert_sharing.analyze(
      d, n_seqs=_NSEQ.value, blocks=[int(b) for b in _BLOCKS.value],
      k_primes=[int(k) for k in _KP.value] or None, betas=[float(b) for b in _BETAS.value])
      for label, d in runs.items()}
  rep = expert_sharing.report(results, analysis_runs.out_dir())
  common.finish(rep, analysis_runs.out_dir(), "expert_sharing", "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
