"""Flags and run resolution shared by the experiments/analyze_*.py scripts: which trained runs
to analyse (--runs label=run_dir), or which tiny runs to train for --preset=tiny."""
from absl import flags

from jaxlm.analysis import common


def define_flags(default_kinds: list[str], what: str = "trained runs") -> None:
  flags.DEFINE_list("runs", [], f"label=run_dir of {what} (else --preset)")
  flags.DEFINE_string("preset", "tiny", "tiny: train CPU-sized runs under --work_dir")
  flags.DEFINE_list("kinds", default_kinds, "tiny runs to train and analyse")
  flags.DEFINE_string("work_dir", "/tmp/jaxlm_analysis_runs", "where tiny runs live")
  flags.DEFINE_integer("train_steps", 200, "tiny training steps")
  flags.DEFINE_integer("checkpoint_every", 50, "tiny checkpoint interval")
  flags.DEFINE_multi_string("set", [], "extra config overrides of the tiny runs")
  flags.DEFINE_string("out_dir", "experiments/results/analysis", "tables and PNGs")


def resolve_runs():
  """label -> run dir, training the tiny runs first when no --runs are given."""
  f = flags.FLAGS
  return common.resolve_runs(f.runs, f.preset, f.work_dir, f.kinds, f.train_steps,
                             f.checkpoint_every, f.set)


def out_dir() -> str:
  return flags.FLAGS.out_dir
