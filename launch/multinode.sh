#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous and automatic restarts. Run the same command on every
# node (any node can be the rendezvous host; node ranks are assigned by the rendezvous):
#
#   launch/multinode.sh NNODES RDZV_HOST:PORT [train_imagenet.py args...]
#   (NNODES may be MIN:MAX: an elastic job, launch/README.md "Elastic jobs")
#   e.g. on each of 4 nodes:
#   NPROC_PER_NODE=8 launch/multinode.sh 4 node001:29500 --config configs/imagenet/wrn50_2_bottleneck.yaml \
#       data.root=/data/imagenet run.output_dir=/shared/runs/wrn50_2
#
# Environment: NPROC_PER_NODE (default: GPUs on this node, else 1), MAX_RESTARTS (default 3),
# RDZV_ID (default wrn), LAST_CALL_S (default 10: an elastic job's rendezvous waits this long for
# more nodes once MIN are in), NODE_RANK (optional; c10d assigns one otherwise), STOP_GRACE_S (default
# 150: the seconds the ranks get from a stop signal, SIGTERM or SIGUSR1 to torchrun, to their
# exit, passed as torchrun's --shutdown-timeout; launch/README.md's grace rule says what it must
# cover; whatever sends the signal must wait that long before its SIGKILL).
# A worker that dies makes torchrun restart the whole group (up to MAX_RESTARTS times); the
# trainer resumes from the newest valid checkpoint in run.output_dir (run.resume=auto), which
# must be on storage every node sees.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,19p' "$0"; exit 2
fi
NNODES=$1; ENDPOINT=$2; shift 2
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
RDZV_CONF=()
case "$NNODES" in *:*) RDZV_CONF=(--rdzv-conf="last_call_timeout=${LAST_CALL_S:-10}") ;; esac
# launch/torchrun.py: torchrun, with the end of an elastic job below its minimum said in one line
exec "$PYTHON" launch/torchrun.py \
    --nnodes="$NNODES" ${NODE_RANK:+--node-rank="$NODE_RANK"} ${RDZV_CONF[@]+"${RDZV_CONF[@]}"} \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="${RDZV_ID:-wrn}" \
    --max-restarts="${MAX_RESTARTS:-3}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${STOP_GRACE_S:-150}" \
    train_imagenet.py "$@"
