#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (pdsh/ssh to every host listed), ZeRO from a JSON here:
#
#   launch/deepspeed_hostfile.sh launch/hostfile.example launch/deepspeed/zero2_bf16.json \
#       --config configs/imagenet/wrn50_2_bottleneck.yaml data.root=/data/imagenet
#
# The trainer reads the JSON for ZeRO/precision/communication; batch sizes, accumulation and
# clipping come from the recipe (train.*, optim.*), never from DeepSpeed's defaults.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0"; exit 2
fi
HOSTFILE=$1; DS_CONFIG=$2; shift 2
cd "$(dirname "$0")/.."
DEEPSPEED=${DEEPSPEED:-$( [ -x .venv/bin/deepspeed ] && echo .venv/bin/deepspeed || echo deepspeed)}
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
    train_imagenet.py engine.name=deepspeed engine.deepspeed_config="$DS_CONFIG" "$@"
