#!/usr/bin/env bash
# Single-node, multi-GPU osp training with torchrun: one worker process per GPU.
#
#   NGPU=8 RECIPE=osp launch/torchrun.sh [hydra overrides ...]
#   NGPU=8 RECIPE=osp RUN_NAME=osp-20260101-120000 launch/torchrun.sh     # resume that run
#
# Environment (all optional):
#   NGPU       workers, one per GPU          default: the number of visible GPUs (1 without any)
#   RECIPE     recipe=<name>                 default: tiny
#   TRAINER    trainer=<name> (ddp | fsdp)   default: fsdp
#   RUN_NAME   run dir under runs_root       default: <RECIPE>-<date>-<time>, fixed here once for all ranks
#   TORCHRUN   the torchrun command          default: torchrun
# Every argument is passed through to `python -m osp.train` after the launcher's own overrides, so it
# wins over them (e.g. `resume=null`, `trainer.precision=32-true`).
# The run always starts with resume=auto: a fresh RUN_NAME starts at step 0, an existing one continues
# from its newest checkpoint (after a crash, a SIGTERM, or a finished run given more trainer.max_steps).
set -euo pipefail

NGPU=${NGPU:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
RECIPE=${RECIPE:-tiny}
TRAINER=${TRAINER:-fsdp}
RUN_NAME=${RUN_NAME:-${RECIPE}-$(date +%Y%m%d-%H%M%S)}
TORCHRUN=${TORCHRUN:-torchrun}

# One CPU thread pool per worker, sized to its share of the cores (torchrun's default is 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}
# NCCL knobs, uncomment when needed:
# export NCCL_DEBUG=WARN                         # INFO to see rings/trees and the transport in use
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1       # a hung collective fails the job instead of waiting forever
# export NCCL_P2P_DISABLE=1                      # consumer GPUs without working peer-to-peer

echo "osp launch: ${NGPU} workers, recipe=${RECIPE} trainer=${TRAINER} run_name=${RUN_NAME}"
# --standalone: a private rendezvous on a free local port. SIGTERM to torchrun reaches every worker,
# which saves checkpoints/last.ckpt at the next step and exits; --shutdown-timeout gives it the time.
exec ${TORCHRUN} --standalone --nproc-per-node="${NGPU}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120 \
    -m osp.train recipe="${RECIPE}" trainer="${TRAINER}" run_name="${RUN_NAME}" resume=auto "$@"
