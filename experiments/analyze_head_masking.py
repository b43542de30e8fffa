"""Head masking: relational cloze HIT@10 after masking the top-k most important heads.

  python experiments/analyze_head_masking.py --preset=tiny --out_dir=/tmp/heads
  python experiments/analyze_head_masking.py --runs=moe=runs/x --triples=facts.tsv
Definitions: jaxlm/analysis/head_masking.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

_RUNS = flags.DEFINE_list("runs", [], "label=run_dir of trained runs (else --preset)")
_PRESET = flags.DEFINE_string("preset", "tiny", "tiny: train CPU-sized runs under --work_dir")
_KINDS = flags.DEFINE_list("kinds", ["dense", "moe", "unipool"], "tiny runs to train")
_WORK = flags.DEFINE_string("work_dir", "/tmp/jaxlm_analysis_runs", "where tiny runs live")
_STEPS = flags.DEFINE_integer("train_steps", 200, "tiny training steps")
_CKPT = flags.DEFINE_integer("checkpoint_every", 50, "tiny checkpoint interval")
_SET = flags.DEFINE_multi_string("set", [], "extra config overrides of the tiny runs")
_OUT = flags.DEFINE_string("out_dir", "experiments/results/analysis", "tables and PNGs")
_TRIPLES = flags.DEFINE_string("triples", "", "subject<TAB>relation<TAB>object file "
                               "(default: mined from the first run's corpus)")
_RELS = flags.DEFINE_list("relations", ["of"], "relation words for mining")
_MIN = flags.DEFINE_integer("min_count", 3, "mined fact must occur this often")
_MAXF = flags.DEFINE_integer("max_triples", 200, "facts used")
_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8"], "numbers of heads masked")
_IMP = flags.DEFINE_list("importance", ["gradient", "lpi", "random"], "importance measures")
_IG = flags.DEFINE_integer("ig_steps", 8, "Riemann points of the Gated-LPI path integral")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from jaxlm.analysis import common, head_masking
  runs = common.resolve_runs(_RUNS.value, _PRESET.value, _WORK.value, _KINDS.value,
                             _STEPS.value, _CKPT.value, _SET.value)
  if _TRIPLES.value:
    facts = head_masking.read_triples(_TRIPLES.value)
  else:
    from jaxlm.data import load_documents
    first = common.load(next(iter(runs.values())))
    facts = head_masking.mine_triples(load_documents(first.cfg.data), tuple(_RELS.value),
                                      _MIN.value, _MAXF.value)
  results = {label: head_masking.analyze(d, facts, [int(k) for k in _KS.value],
                                         tuple(_IMP.value), ig_steps=_IG.value)
             for label, d in runs.items()}
  rep = head_masking.report(results, _OUT.value)
  common.finish(rep, _OUT.value, "head_masking", "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
