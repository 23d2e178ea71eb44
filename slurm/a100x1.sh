#!/bin/bash
# pascal-dist on one A100: the reference recipe (20k steps, ~655M tokens) on a single GPU.
#
#   sbatch slurm/a100x1.sh                                  # reference recipe, runs/pascal-a100x1-<jobid>
#   CONFIG=configs/gpt2-medium.yaml sbatch slurm/a100x1.sh train.max_steps=100
#
# One task, one GPU: the same srun launch as the 8-GPU and multi-node scripts (slurm/common.sh),
# so a run that works here scales by changing #SBATCH lines only.
#
# Environment variables (all optional):
#   CONFIG        run config YAML (default: none, i.e. the reference recipe; e.g. configs/gpt2-medium.yaml)
#   DS_CONFIG     DeepSpeed JSON (default configs/zero2.json)
#   RUN_DIR       checkpoints + TensorBoard (default runs/<job name>-<job id>; on shared storage; set it to
#                 continue an earlier job's run in a new job, a requeued job keeps its id and so its RUN_DIR)
#   OVERRIDES     space-separated key=value config overrides (script arguments are appended after them)
#   PYTHON        interpreter with pascal-dist installed (default python3)
#   SETUP         shell code run first, e.g. 'module load cuda/12.4; source ~/venvs/pd/bin/activate'
#   PASCAL_DIST_HOME  the checkout (default: the directory sbatch was run from)
#   MAX_RESTARTS  stop requeueing after this many preemptions (default 20)
# Relative paths are relative to the checkout. sbatch flags on the command line override the #SBATCH
# lines below (-p, --time, --nodes, -A ...). Logs: <job name>-<job id>.out/.err in the submission
# directory, appended to across requeues.
#
# --signal=USR1@300 (not B:USR1): Slurm signals every rank itself about 5 min (up to a minute more) before
# the time limit; each finishes its step, saves and exits 75, and the job requeues itself and resumes.
# B: would signal only this shell, which would then have to relay the signal to the ranks. Raise the 300
# when a checkpoint takes longer to write (ZeRO-3 at 1.3B writes ~20 GB).
#SBATCH --job-name=pascal-a100x1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=08:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail
# sbatch runs a copy of this file from slurmd's spool directory: find the checkout from the submission.
PASCAL_DIST_HOME=${PASCAL_DIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$PASCAL_DIST_HOME/slurm/common.sh" || { echo "error: submit from the pascal-dist checkout or set PASCAL_DIST_HOME" >&2; exit 2; }
pd_launch "$@"
