#!/bin/bash
# sbatch --array=0-N slurm/sweep.sh DIR/sweep.json              (from the repository root)
#
# One job of a `--sweep` (launch/sweep.py) per array task: task i trains run i of DIR/sweep.json
# (`submit.py --cluster local` inside this allocation: torchrun on this node) and evaluates it with the
# `scenes` suite. Submitted by `python launch/submit.py --sweep table3 --cluster slurm --run-dir DIR ...`,
# which writes the manifest and passes --array, --cpus-per-task, --gpus-per-node and --output. A re-submit
# skips finished runs and resumes the others from their latest checkpoint.
# Environment: PYTHON (python).
#
#SBATCH --job-name=unimrg-sweep
#SBATCH --ntasks=1
#SBATCH --nodes=1
#SBATCH --time=02:00:00
#SBATCH --requeue                    # a preempted task resumes its run from the latest checkpoint
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

PYTHON=${PYTHON:-python}
cd "${SLURM_SUBMIT_DIR:-.}"
MANIFEST=${1:?usage: sbatch --array=0-N slurm/sweep.sh DIR/sweep.json}
echo "array job ${SLURM_ARRAY_JOB_ID:-none} task ${SLURM_ARRAY_TASK_ID:-0} on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"
exec "$PYTHON" launch/sweep.py job "$MANIFEST" "${SLURM_ARRAY_TASK_ID:-0}"
