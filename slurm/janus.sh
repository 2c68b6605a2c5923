#!/bin/bash
# sbatch slurm/janus.sh [key=value ...]            (from the repository root)
#
# UniMRG fine-tuning of Janus-Pro-1B on one 8-GPU node (launch/recipes/janus_paper.yaml, Harmon's row of the paper:
# lr 1e-5, 16 per task × accumulation 4 × 8 GPUs, 4,000 steps). Arguments are recipe overrides, e.g.
#   sbatch slurm/janus.sh model.checkpoint=/ckpt/Janus-Pro-1B data.root=/data/unimrg
# Environment: RECIPE (paper), RUN_DIR (runs/janus_$RECIPE), MAX_REQUEUES (5), PYTHON (python).
# Resources: edit the lines below or override them on sbatch's command line, which wins over them:
#   sbatch --nodes=2 --partition=gpu --account=proj slurm/janus.sh          (16 GPUs)
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --mem=4G \
#       slurm/janus.sh train.steps=4          (with RECIPE=tiny: CPU ranks, as the tests run it)
#
#SBATCH --job-name=unimrg-janus
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8          # one task (rank) per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12           # data-loader workers (data.num_workers) + the rank itself
#SBATCH --mem=0                      # all of each node's memory
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@180          # 3 min before the limit: ranks checkpoint, this script requeues
#SBATCH --requeue                    # a requeued job keeps its id and resumes from the latest checkpoint
#SBATCH --open-mode=append           # requeued runs append to the same log
#SBATCH --output=%x-%j.out
set -euo pipefail

MODEL=janus
# The body the three model scripts share (sbatch runs a copy of this file, so find it from the
# submit directory): slurm/train_job.sh.
source "${SLURM_SUBMIT_DIR:-.}/slurm/train_job.sh"
