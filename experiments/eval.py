"""Validation loss and perplexity of a trained run.

  python experiments/eval.py --run_dir=runs/tiny_cpu [--step=500] [--batches=32]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

_RUN = flags.DEFINE_string("run_dir", None, "a train.output_dir holding checkpoints/", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: newest)")
_SET = flags.DEFINE_multi_string(
    "set", [], "section.field=value overrides of the run's config; the model may change only "
    "in how it runs (e.g. model.scan_layers=false, model.remat, kernel implementations)")
_BATCHES = flags.DEFINE_integer("batches", 0, "validation batches (0 = the run's train.eval_batches)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from jaxlm.evaluate import evaluate_run
  from jaxlm.train.restore import load_run
  try:
    run = load_run(_RUN.value, _STEP.value, overrides=_SET.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  out = evaluate_run(run, _BATCHES.value or run.cfg.train.eval_batches)
  print(f"step {run.step}: val loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}  "
        f"({out['tokens']:.0f} tokens)")


if __name__ == "__main__":
  app.run(main)
