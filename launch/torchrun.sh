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
# Every argument is passed through to `python -m osp train` after the launcher's own overrides, so it
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

# torchrun's agent answers a signal it forwarded with a Python traceback (SignalException) once the
# workers have stopped cleanly: that traceback is dropped from stderr. When a worker dies (killed, out of
# memory), the agent's traceback and failure table (ChildFailedError) become one line naming the rank, how it
# ended and how to continue. Every other line is kept.
quiet_signal_traceback() {
    awk -v run="${RUN_NAME}" -v recipe="${RECIPE}" '
         /^Traceback \(most recent call last\):/ { held = $0; holding = 1; next }
         holding && /^[ \t]/ { held = held "\n" $0; next }
         holding { holding = 0
                   if ($0 ~ /SignalException/) next
                   if ($0 ~ /ChildFailedError/) { table = 1; rank = "?"; how = "?"; next }
                   print held; fflush() }
         table && /^[ \t]*rank[ \t]*:/ { sub(/^[ \t]*rank[ \t]*:[ \t]*/, ""); rank = $1; next }
         table && /exitcode[ \t]*:/ { sub(/.*exitcode[ \t]*:[ \t]*/, ""); how = "exit code " $1; next }
         table && /traceback[ \t]*:[ \t]*Signal/ { sub(/.*traceback[ \t]*:[ \t]*/, ""); how = $0; next }
         table && /^=+$/ { if (++rules == 2) { table = 0; rules = 0
                   print "osp launch: rank " rank " died (" how "); the run keeps its checkpoints: continue " \
                         "with RECIPE=" recipe " RUN_NAME=" run " launch/torchrun.sh (it resumes with resume=auto)"
                   fflush() } next }
         table { next }
         { print; fflush() }'
}
exec 3> >(trap '' TERM INT HUP QUIT USR1; quiet_signal_traceback >&2)  # outlives a signal to the group
filter=$!

# A signal to this script goes to torchrun, which forwards it to every worker; the script then exits
# 128 + the signal number (143 SIGTERM, 138 SIGUSR1, 130 SIGINT), as the workers do, not torchrun's 1.
signalled=0
forward() { signalled=$(( 128 + $(kill -l "$1") )); kill -s "$1" "${pid}" 2>/dev/null || true; }
for sig in TERM INT HUP QUIT USR1; do trap "forward ${sig}" "${sig}"; done

# --standalone: a private rendezvous on a free local port. SIGTERM to torchrun reaches every worker,
# which saves checkpoints/last.ckpt at the next step and exits; --shutdown-timeout gives it the time.
${TORCHRUN} --standalone --nproc-per-node="${NGPU}" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=120 \
    -m osp train recipe="${RECIPE}" trainer="${TRAINER}" run_name="${RUN_NAME}" resume=auto "$@" 2>&3 &
pid=$!
status=0
while true; do  # `wait` returns early when a trapped signal arrives; torchrun is still shutting down then
    wait "${pid}" && status=0 || status=$?
    kill -0 "${pid}" 2>/dev/null || break
done
exec 3>&-
wait "${filter}" 2>/dev/null || true
if (( signalled )); then exit "${signalled}"; fi
exit "${status}"
