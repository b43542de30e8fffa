#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU (default) or one per node.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh --config=dense_1b --set mesh.fsdp=-1
#   PER_NODE=1 sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh --config=...
#
# jax.distributed.initialize() reads the SLURM environment itself (JAXLM_DISTRIBUTED=auto).
# Exit status 75 means preempted after a committed checkpoint: requeue to resume.
#SBATCH --job-name=jaxlm
#SBATCH --ntasks-per-node=8
#SBATCH --output=runs/slurm-%j.out
#SBATCH --requeue
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ "${PER_NODE:-0}" == "1" ]]; then
  TASKS=(--ntasks-per-node=1)
else
  TASKS=(--ntasks-per-node="${SLURM_GPUS_PER_NODE:-8}" --gpus-per-task=1)
fi
export JAXLM_DISTRIBUTED=auto
srun "${TASKS[@]}" --kill-on-bad-exit=1 python experiments/train.py "$@" || status=$?
status=${status:-0}
if [[ $status -eq 75 ]]; then
  echo "preempted after a committed checkpoint; requeueing"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $status
