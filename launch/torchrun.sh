#!/usr/bin/env bash
# Starts the trainer on this node under torchrun: one process per visible GPU, or one on a CPU-only
# node. Run it on every node of a cluster without SLURM; pretrain.sbatch runs it through srun.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host launch/torchrun.sh CONFIG [--section.key=value ...]
#
# Environment:
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node's rank, 0 on MASTER_ADDR (required when NNODES > 1 without RDZV_ID)
#   MASTER_ADDR     address of node 0 (default localhost); MASTER_PORT (default 29500)
#   RDZV_ID         set: c10d rendezvous hosted at MASTER_ADDR:MASTER_PORT, ranks handed out as
#                   nodes arrive (pretrain.sbatch uses the job id); unset: static ranks
#   NPROC_PER_NODE  processes on this node (default: GPUs visible, else 1)
#   PYTHON          interpreter with llamatrain installed (default: python3 on PATH)
#   FABRIC, NCCL_*  see launch/fabric.sh
#
# Exits with the trainer's exit code: 75 means a checkpoint was saved on request (SIGUSR1 or
# SIGTERM to the worker processes) and the same command resumes the run.
set -euo pipefail

# Under pretrain.sbatch (LLAMATRAIN_REQUEUE_DIR set), the node's exit code is left for its
# requeue verdict (llamatrain.requeue) beside the ranks' own records: a bad configuration is
# found here, before any rank starts.
leave_record() {
    if [[ -n ${LLAMATRAIN_REQUEUE_DIR:-} ]]; then
        mkdir -p "$LLAMATRAIN_REQUEUE_DIR"
        echo "$1" >"$LLAMATRAIN_REQUEUE_DIR/node-${SLURMD_NODENAME:-$(hostname)}"
    fi
}

node_exit() {
    leave_record "$1"
    exit "$1"
}

die() {
    echo "torchrun.sh: $*" >&2
    node_exit 2
}

[[ $# -ge 1 && $1 != -* ]] || die "usage: [NNODES=N NODE_RANK=R MASTER_ADDR=HOST]" \
    "launch/torchrun.sh CONFIG [--section.key=value ...]"
launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=$1
shift
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES is '$NNODES'; allowed: a positive integer"
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT is '$MASTER_PORT'; allowed: a port number"

# The config loader resolves run.dir (file, then overrides) and rejects a bad config here, on the
# launching node, instead of once per worker.
RUN_DIR=$("$PYTHON" -c '
import sys
from llamatrain.config import load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run.dir)
except ValueError as e:
    sys.exit(f"torchrun.sh: {e}")
' "$config" "$@") || node_exit 2
export RUN_DIR

visible_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        # SLURM's gres plugin (or the user) decided which GPUs this node's processes see.
        case $CUDA_VISIBLE_DEVICES in
            ""|-1|NoDevFiles) echo 0 ;;
            *) awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES" ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
nproc=${NPROC_PER_NODE:-$(visible_gpus)}
[[ $nproc =~ ^[0-9]+$ ]] || die "NPROC_PER_NODE is '$nproc'; allowed: a positive integer"
(( nproc > 0 )) || nproc=1

# shellcheck source=launch/fabric.sh
source "$launch_dir/fabric.sh"

if [[ -n ${RDZV_ID:-} ]]; then
    rendezvous=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
                --rdzv-id="$RDZV_ID")
elif (( NNODES == 1 )); then
    # A free port of its own, so that two single-node runs on one machine do not collide.
    rendezvous=(--standalone)
else
    if ! [[ ${NODE_RANK:-} =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
        die "NODE_RANK is '${NODE_RANK:-}'; allowed: 0 to $((NNODES - 1)) (0 on MASTER_ADDR)"
    fi
    rendezvous=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR"
                --master-port="$MASTER_PORT")
fi

# On SIGTERM (scancel, time limit, preemption by SLURM) torchrun passes it to the workers, which
# save, and kills them after this grace period: 30 s by default, too short for a large checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
# torchrun dies of SIGUSR1 and leaves its workers orphaned; SLURM signals every process of the
# step, so torchrun (and this shell) must ignore it. The workers inherit the ignore until the
# trainer installs its own handler, which is what saves and exits.
trap '' USR1
echo "torchrun.sh: $(hostname) ${SLURMD_NODENAME:+($SLURMD_NODENAME) }$nproc process(es)," \
     "nodes $NNODES, run dir $RUN_DIR"
rc=0
"$PYTHON" "$launch_dir/torchrun_exit.py" "${rendezvous[@]}" --nproc-per-node="$nproc" \
    --max-restarts=0 -m llamatrain.train --config "$config" "$@" || rc=$?

if (( rc == 75 )) && [[ -n ${LLAMATRAIN_REQUEUE_DIR:-} ]]; then
    # Under srun --kill-on-bad-exit, the first node to exit non-zero has SLURM kill the others,
    # still writing their own exit, and srun then reports their SIGTERM instead of 75. So the
    # ranks leave exit records in LLAMATRAIN_REQUEUE_DIR for pretrain.sbatch (llamatrain.requeue)
    # and a node that stopped for a requeue exits 0.
    leave_record "$rc"
    exit 0
fi
node_exit "$rc"
