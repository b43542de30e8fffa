#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM, install jaxlm on every worker, run the
# same command on all workers (jax.distributed finds the pod itself), optionally delete.
#
#   launch/tpu_pod.sh --name=my-v5p --zone=us-east5-a --type=v5p-64 [--version=v2-alpha-tpuv5] \
#       [--keep] -- --config=dense_1b --set mesh.fsdp=-1 --set mesh.data=1
#
# Checkpoints and logs should go to shared storage (e.g. --set train.output_dir=gs://bucket/run).
# A preempted run (exit status 75) resumes when the same command is run again.
set -euo pipefail
NAME="" ZONE="" TYPE="" VERSION="tpu-ubuntu2204-base" KEEP=0 REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}";; --zone=*) ZONE="${1#*=}";; --type=*) TYPE="${1#*=}";;
    --version=*) VERSION="${1#*=}";; --keep) KEEP=1;;
    --) shift; break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
  shift
done
[[ -n "$NAME" && -n "$ZONE" && -n "$TYPE" ]] || { echo "need --name, --zone and --type" >&2; exit 2; }
TRAIN_ARGS=("$@")

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" --version="$VERSION"
fi
# Ship the working tree (not a git remote: what you run is what you have).
tar -C "$REPO_DIR" --exclude=.git --exclude=runs --exclude=.venv -czf /tmp/jaxlm.tgz .
gcloud compute tpus tpu-vm scp /tmp/jaxlm.tgz "$NAME":/tmp/jaxlm.tgz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p ~/jaxlm && tar -C ~/jaxlm -xzf /tmp/jaxlm.tgz && cd ~/jaxlm &&
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
status=0
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
  cd ~/jaxlm && . .venv/bin/activate && JAXLM_DISTRIBUTED=auto python experiments/train.py $(printf '%q ' "${TRAIN_ARGS[@]}")" || status=$?
if [[ $KEEP -eq 0 ]]; then
  gcloud compute tpus tpu-vm delete "$NAME" --zone="$ZONE" --quiet
fi
exit $status
