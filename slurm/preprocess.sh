#!/bin/bash
# sbatch --array=0-31 slurm/preprocess.sh DATA_ROOT [job options]          (from the repository root)
# sbatch --array=0 --dependency=afterok:ARRAY_JOB_ID --gpus-per-node=0 slurm/preprocess.sh finalize DATA_ROOT
#
# Depth and segmentation targets of the UniMRG training data (paper, Appendix B.2/B.3) as a plain job
# array, one GPU per array task: task i of n runs `python -m unimrg.targets.job` on shards i, i+n, ...
# of DATA_ROOT/images.jsonl. Before it, once (CPU only):
#   python -m unimrg.targets.ingest --llava llava_v1_5_mix665k.json --image-root /data/llava --out DATA_ROOT
# After it, once: the `finalize` line above (checks every shard, writes the Energon metadata,
# DATA_ROOT/report.jsonl and summary.json); DATA_ROOT is then the trainer's data.root.
#
# Resuming: re-submit the same array (a preempted task is requeued by itself): finished shards are
# skipped, partial ones redone. Keep --shard-size and the SAM/depth options of a started DATA_ROOT (the
# job refuses other ones). The array must be contiguous (0-N, optionally %throttle).
# An image on which a task was killed twice (OOM, segfault) is skipped as "poison" by the requeued
# task; to drop images by hand, pass `--exclude FILE` (keys or paths): finished shards stay valid.
# Environment: DEPTH_MODEL, SAM_MODEL (local HF folders: Depth-Anything-V2-Large-hf, sam-vit-huge;
# required), IMAGES (DATA_ROOT/images.jsonl), PYTHON (python). Extra arguments go to the job, e.g.
#   sbatch --array=0-63%16 slurm/preprocess.sh /data/unimrg --shard-size 1000
# Sizing (notes/preprocessing.md): SAM-H automatic masks take ~2-4 s per image on an A100, so LLaVA-665K's
# ~624K images need ~15-30 GPU-days: --array=0-63 finishes in roughly 6-12 hours.
#
#SBATCH --job-name=unimrg-preprocess
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4            # the image reader thread and PNG encoding next to the GPU
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue                    # a preempted task restarts and skips its finished shards
#SBATCH --open-mode=append           # a requeued task appends to the same log
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

PYTHON=${PYTHON:-python}
cd "${SLURM_SUBMIT_DIR:-.}"
export HF_HUB_OFFLINE=1                                   # models come from local folders only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

if [ "${1:-}" = finalize ]; then
  ROOT=${2:?usage: sbatch --array=0 --dependency=afterok:ARRAY_JOB_ID slurm/preprocess.sh finalize DATA_ROOT}
  exec "$PYTHON" -m unimrg.targets.job finalize --out "$ROOT"
fi

ROOT=${1:?usage: sbatch --array=0-N slurm/preprocess.sh DATA_ROOT [job options]}
shift
: "${DEPTH_MODEL:?set DEPTH_MODEL to a local folder of HF-format Depth Anything V2 weights (Depth-Anything-V2-Large-hf)}"
: "${SAM_MODEL:?set SAM_MODEL to a local folder of HF-format SAM weights (sam-vit-huge)}"
TASK=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
COUNT=${SLURM_ARRAY_TASK_COUNT:-1}
echo "array job ${SLURM_ARRAY_JOB_ID:-none} task $TASK of $COUNT on $(hostname) (restart ${SLURM_RESTART_COUNT:-0}), GPUs: ${CUDA_VISIBLE_DEVICES:-none}"

exec "$PYTHON" -m unimrg.targets.job --images "${IMAGES:-$ROOT/images.jsonl}" --out "$ROOT" \
  --task-id "$TASK" --num-tasks "$COUNT" --depth-model "$DEPTH_MODEL" --sam-model "$SAM_MODEL" "$@"
