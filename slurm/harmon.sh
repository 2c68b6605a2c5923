#!/bin/bash
# sbatch slurm/harmon.sh [key=value ...]            (from the repository root)
#
# UniMRG fine-tuning of Harmon-1.5B on one 8-GPU node (paper, Appendix B.1: lr 1e-5, 16 per task ×
# accumulation 4 × 8 GPUs, 4,000 steps, ~5 h). Arguments are recipe overrides, e.g.
#   sbatch slurm/harmon.sh model.checkpoint=/ckpt/harmon data.root=/data/unimrg
# Environment: RECIPE (paper), RUN_DIR (runs/harmon_$RECIPE), MAX_REQUEUES (5), PYTHON (python).
# Resources: edit the lines below or override them on sbatch's command line, which wins over them:
#   sbatch --nodes=2 --partition=gpu --account=proj slurm/harmon.sh          (16 GPUs)
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --mem=4G \
#       slurm/harmon.sh train.steps=4          (with RECIPE=tiny: CPU ranks, as the tests run it)
#
#SBATCH --job-name=unimrg-harmon
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task (rank) per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12           # data-loader workers (data.num_workers) + the rank itself
#SBATCH --mem=0                      # all of each node's memory
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@180          # 3 min before the limit: ranks checkpoint, this script requeues
#SBATCH --requeue                    # a requeued job keeps its id and resumes from the latest checkpoint
#SBATCH --open-mode=append           # requeued runs append to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

MODEL=harmon
RECIPE=${RECIPE:-paper}
RUN_DIR=${RUN_DIR:-runs/${MODEL}_${RECIPE}}
MAX_REQUEUES=${MAX_REQUEUES:-5}
PYTHON=${PYTHON:-python}

# SLURM's time-limit warning (--signal above): remembered here, forwarded to the ranks in step 3
signalled=0 srun_pid="" code=1
trap 'signalled=1; echo "$(date +%T) SIGUSR1: the ranks checkpoint and stop"
      if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi' USR1

cd "${SLURM_SUBMIT_DIR:-.}"
NODES=$SLURM_JOB_NUM_NODES
TASKS_PER_NODE=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
GPUS=${SLURM_GPUS_ON_NODE:-0}
RESTARTS=${SLURM_RESTART_COUNT:-0}
if [ "$GPUS" -gt 0 ] && [ "$GPUS" != "$TASKS_PER_NODE" ]; then
  echo "error: $GPUS GPUs but $TASKS_PER_NODE tasks per node: set --ntasks-per-node equal to --gpus-per-node" >&2
  exit 2
fi
echo "job $SLURM_JOB_ID (restart $RESTARTS) on $SLURM_JOB_NODELIST:" \
  "$NODES node(s) × $TASKS_PER_NODE rank(s), $GPUS GPU(s) per node"

# 1. Resolve and validate the recipe into $RUN_DIR/config.yaml (the same step as submit.py, which also
#    generates the tiny recipes' scene data). A requeued start resumes from the latest checkpoint.
RESUME=()
if [ "$RESTARTS" -gt 0 ] && [ -f "$RUN_DIR/checkpoints/latest" ]; then RESUME=(--resume latest); fi
"$PYTHON" launch/submit.py --model "$MODEL" --recipe "$RECIPE" --run-dir "$RUN_DIR" --cluster slurm \
  --prepare-only --nodes "$NODES" --gpus-per-node "$GPUS" --cpu-ranks-per-node "$TASKS_PER_NODE" \
  "${RESUME[@]}" "$@"

# 2. Rendezvous: rank 0 runs on the first node; the port comes from the job id (stable across requeues).
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
export WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$TASKS_PER_NODE CONFIG=$RUN_DIR/config.yaml PYTHON
if [ "$GPUS" -gt 0 ]; then
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1       # a dead rank aborts the others' collectives
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}          # NCCL_SOCKET_IFNAME, NCCL_IB_HCA...: export before sbatch
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
else                                              # CPU ranks over gloo
  export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# 3. One task per GPU, all running the per-rank entry point; a failing rank ends the step (-K).
#    SLURM's warning signal reaches this script only (B:); the trap above passes it to srun, which
#    forwards it to every rank: the trainer finishes its optimizer step, all ranks save, they exit.
if [ "$signalled" = 0 ]; then   # (a signal during step 1 skips training: requeue straight away)
  srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$PYTHON" launch/train.py --config "$CONFIG"' &
  srun_pid=$!
  while true; do
    code=0; wait "$srun_pid" || code=$?
    # a trapped signal interrupts `wait` (status > 128) while srun still runs: keep waiting
    if [ "$code" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
    break
  done
fi

# 4. Stopped on the signal: requeue (same job id; it resumes from the latest checkpoint), boundedly.
#    srun's status does not tell (once the first rank exits with the trainer's PREEMPTED_EXIT_CODE,
#    -K stops the others).
if [ "$signalled" = 1 ] && [ "$code" != 0 ]; then
  if [ "$RESTARTS" -lt "$MAX_REQUEUES" ]; then
    echo "checkpoint: $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none);" \
      "requeueing job $SLURM_JOB_ID (requeue $((RESTARTS + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "stopped on a signal, but already requeued $RESTARTS times (MAX_REQUEUES): resubmit to continue" >&2
fi
exit "$code"
