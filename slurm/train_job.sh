# Sourced by slurm/{openuni,harmon,showo,janus}.sh after their #SBATCH header sets MODEL: recipe → run folder →
# srun one rank per GPU → requeue on SLURM's time-limit warning. Not submitted on its own.
: "${MODEL:?set MODEL before sourcing slurm/train_job.sh}"
RECIPE=${RECIPE:-paper}
RUN_DIR=${RUN_DIR:-runs/${MODEL}_${RECIPE}}
MAX_REQUEUES=${MAX_REQUEUES:-5}
PYTHON=${PYTHON:-python}

# SLURM's time-limit warning (--signal above): remembered here, forwarded to the ranks in step 3
signalled=0 terminated=0 srun_pid="" code=1
trap 'signalled=1; echo "$(date +%T) SIGUSR1: the ranks checkpoint and stop"
      if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi' USR1
# SIGTERM (scontrol requeue, preemption, scancel, the time limit's end) reaches every rank from SLURM
# itself: wait for them to checkpoint rather than end the job under them; SLURM requeues (or not) itself.
trap 'terminated=1; echo "$(date +%T) SIGTERM: the ranks checkpoint and stop"' TERM

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
#    generates the tiny recipes' scene data). A requeued start resumes: it reuses the config.yaml the
#    first start froze (from its latest checkpoint, or from step 0 if it had none yet); the overrides
#    given again must not change it (unimrg/runfolder.py). A new sbatch into a RUN_DIR with checkpoints
#    is refused unless it passes run.resume=latest.
RESUME=()
if [ "$RESTARTS" -gt 0 ]; then RESUME=(--resume latest); fi
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
if [ "$signalled" = 0 ] && [ "$terminated" = 0 ]; then   # (a signal during step 1 skips training)
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
