"""Sample text from a trained run with KV-cache decoding.

  python experiments/generate.py --run_dir=runs/tiny_cpu --prompt="ROMEO:" --temperature=0.8 --top_k=50
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
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:\n", "prompt text")
_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate")
_TEMP = flags.DEFINE_float("temperature", 0.8, "0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
_N = flags.DEFINE_integer("num_samples", 1, "samples to draw")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from jaxlm.generate import Sampling
  from jaxlm.sample import sample_text
  from jaxlm.train.restore import load_run
  try:
    sampling = Sampling(temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    run = load_run(_RUN.value, _STEP.value, overrides=_SET.value)
    texts = sample_text(run.fm, run.params, run.tokenizer, _PROMPT.value, _TOKENS.value, sampling,
                        seed=_SEED.value, num_samples=_N.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}")
  for i, text in enumerate([texts] if isinstance(texts, str) else texts):
    print(f"--- sample {i} (step {run.step})\n{_PROMPT.value}{text}")


if __name__ == "__main__":
  app.run(main)
