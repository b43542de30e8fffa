"""DES-Seq / DES-Vote expert sharing for block decoding: unique experts vs quality kept.

  python experiments/analyze_expert_sharing.py --preset=tiny --out_dir=/tmp/des
  python experiments/analyze_expert_sharing.py --runs=moe=runs/x --blocks=8,32,0
Definitions: jaxlm/analysis/expert_sharing.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

_RUNS = flags.DEFINE_list("runs", [], "label=run_dir of trained MoE runs (else --preset)")
_PRESET = flags.DEFINE_string("preset", "tiny", "tiny: train CPU-sized runs under --work_dir")
_KINDS = flags.DEFINE_list("kinds", ["moe_top2", "unipool"], "tiny runs to train")
_WORK = flags.DEFINE_string("work_dir", "/tmp/jaxlm_analysis_runs", "where tiny runs live")
_STEPS = flags.DEFINE_integer("train_steps", 200, "tiny training steps")
_CKPT = flags.DEFINE_integer("checkpoint_every", 50, "tiny checkpoint interval")
_SET = flags.DEFINE_multi_string("set", [], "extra config overrides of the tiny runs")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/analysis", "tables and PNGs")
_NSEQ = flags.DEFINE_integer("n_seqs", 16, "validation windows")
_BLOCKS = flags.DEFINE_list("blocks", ["8", "0"], "block sizes (0 = whole sequence)")
_KP = flags.DEFINE_list("k_primes", [], "DES-Seq k' values (default 1 and K-1)")
_BETAS = flags.DEFINE_list("betas", ["0.15", "0.25", "0.5"], "DES-Vote kept fractions")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxlm.analysis import common, expert_sharing
  runs = common.resolve_runs(_RUNS.value, _PRESET.value, _WORK.value, _KINDS.value,
                             _STEPS.value, _CKPT.value, _SET.value)
  results = {label: expert_sharing.analyze(
      d, n_seqs=_NSEQ.value, blocks=[int(b) for b in _BLOCKS.value],
      k_primes=[int(k) for k in _KP.value] or None, betas=[float(b) for b in _BETAS.value])
      for label, d in runs.items()}
  rep = expert_sharing.report(results, _OUT.value)
  common.finish(rep, _OUT.value, "expert_sharing", "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
