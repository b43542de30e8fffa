"""Train a model; re-running the same command resumes from the newest checkpoint.

  python experiments/train.py --config=tiny_cpu
  python experiments/train.py --config=dense_125m --set train.batch_size=32 --set train.output_dir=/tmp/run
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from jaxlm import cli
from jaxlm.config import ConfigError

_SAMPLE = flags.DEFINE_integer("sample_tokens", 120, "tokens of the sample printed at the end (0 = none)")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:\n", "prompt of the final sample")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    cfg = cli.config_from_flags()
  except ConfigError as e:
    cli.fail(e)
  import jax
  from jaxlm.distributed import maybe_initialize
  maybe_initialize()
  from jaxlm.generate import Sampling
  from jaxlm.sample import sample_text
  from jaxlm.train.checkpoint import CheckpointSaveError
  from jaxlm.train.loop import CheckpointRestoreError, NonFiniteError, Trainer
  try:
    trainer = Trainer(cfg)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    cli.fail(e)
  try:
    result = trainer.run()
    trainer.close()
  except (ConfigError, CheckpointRestoreError, CheckpointSaveError, NonFiniteError) as e:
    cli.fail(e)
  params = trainer.state.params
  if _SAMPLE.value and jax.process_count() > 1:  # every process takes part in the gather
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    print(f"done: step {result.final_step}, val loss {result.val_loss}, train loss "
          f"{result.train_loss}, {result.seconds:.0f}s, checkpoints in {trainer.ckpt.directory}")
    if _SAMPLE.value:
      text = sample_text(trainer.fm, params, trainer.tokenizer, _PROMPT.value,
                         _SAMPLE.value, Sampling(temperature=0.8, top_k=50), seed=cfg.train.seed)
      print("sample:\n" + _PROMPT.value + text)


if __name__ == "__main__":
  app.run(main)
