"""Head masking: relational cloze HIT@10 after masking the top-k most important heads.

  python experiments/analyze_head_masking.py --preset=tiny --out_dir=/tmp/heads
  python experiments/analyze_head_masking.py --runs=moe=runs/x --triples=facts.tsv
Definitions: jaxlm/analysis/head_masking.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from experiments import analysis_runs

analysis_runs.define_flags(["dense", "moe", "unipool"])
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
  runs = analysis_runs.resolve_runs()
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
  rep = head_masking.report(results, analysis_runs.out_dir())
  common.finish(rep, analysis_runs.out_dir(), "head_masking", "python " + " ".join(sys.argv))


if __name__ == "__main__":
  app.run(main)
