"""Multi-process start-up: jax.distributed.initialize when launched as one of several processes."""
import os

import jax


def maybe_initialize() -> None:
  """Initialise jax.distributed when the launcher set JAXLM_COORDINATOR (or a cluster env is detected).

  Variables: JAXLM_COORDINATOR=host:port, JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID. On TPU pods and
  SLURM, jax.distributed.initialize() finds these itself: set JAXLM_DISTRIBUTED=auto.
  """
  if os.environ.get("JAXLM_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAXLM_COORDINATOR"],
        num_processes=int(os.environ["JAXLM_NUM_PROCESSES"]),
        process_id=int(os.environ["JAXLM_PROCESS_ID"]))
  elif os.environ.get("JAXLM_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
