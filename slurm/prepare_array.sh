#!/bin/bash
# pascal-dist data preparation on many nodes: one part of the corpus per array task, then one merge job.
#
#   OUT=data/big sbatch --array=0-15 slurm/prepare_array.sh --files /corpus/shard-*.jsonl --streaming
#   OUT=data/wt103 sbatch --array=0-3 slurm/prepare_array.sh --source wikitext --config wikitext-103-raw-v1
#
# Array task i of N runs `launcher/prepare_data.py ARGS --part i/N --workers <its CPUs>` into
# $PARTS_DIR/part-<i>-of-<N>, with the script's arguments as ARGS. Task 0 also submits the merge job: it starts once
# every part has succeeded (--dependency=afterok), is cancelled if one fails, and writes $OUT from the parts
# (`prepare_data.py --merge`), byte-identical to a single-process preparation of the same source. Every part trains
# the same tokenizer from the same sample (the first --tokenizer-sample train documents, deterministic), or give
# --tokenizer. With --streaming, parts divide the source by files, so N may not exceed the number of files; without
# it, by rows, after each task has converted the source to datasets' cache (on a shared HF_HOME, the first task
# converts it and the others wait for it and reuse it).
#
# Environment variables:
#   OUT           the data directory to write (required)
#   PARTS_DIR     where the parts go (default $OUT.parts); on storage every node sees. Delete it after the merge.
#   WORKERS       processes per part (default: the task's CPUs, --cpus-per-task)
#   MERGE         1 (default): task 0 submits the merge job; 0: merge yourself (the command is in task 0's log)
#   PYTHON        interpreter with pascal-dist installed (default python3)
#   SETUP         shell code run first, e.g. 'module load python/3.11; source ~/venvs/pd/bin/activate'
#   PASCAL_DIST_HOME  the checkout (default: the directory sbatch was run from)
# Relative paths are relative to the checkout. sbatch flags on the command line override the #SBATCH lines below.
# Logs: <job name>-<array job id>_<task>.out/.err, and pascal-prepare-merge-<job id>.out/.err, in the submission
# directory. A part that exists already is skipped ("already prepared"), so after a failure resubmit the same
# command: only the missing parts run.
#SBATCH --job-name=pascal-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --error=%x-%A_%a.err
set -euo pipefail
START_DIR=$PWD  # the job's working directory (--chdir or the submission directory): the merge job logs there too
# sbatch runs a copy of this file from slurmd's spool directory: find the checkout from the submission.
PASCAL_DIST_HOME=${PASCAL_DIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}

log() { echo "[slurm] $*"; }
die() { echo "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch --array=0-<N-1> (SLURM_JOB_ID is not set)"
cd "$PASCAL_DIST_HOME" || die "cannot cd to PASCAL_DIST_HOME=$PASCAL_DIST_HOME"
[ -n "${OUT:-}" ] || die "set OUT to the data directory to write: OUT=data/big sbatch --array=0-15 slurm/prepare_array.sh ..."
PARTS_DIR=${PARTS_DIR:-$OUT.parts}
PYTHON=${PYTHON:-python3}
SETUP=${SETUP:-}
MERGE=${MERGE:-1}
export PYTHONUNBUFFERED=1
if [ -n "$SETUP" ]; then
  log "setup: $SETUP"
  eval "$SETUP" || die "SETUP failed: $SETUP"
fi

part_dir() { printf '%s/part-%05d-of-%05d' "$PARTS_DIR" "$1" "$2"; }

# The merge job (submitted by task 0, see below): every part, in order, into OUT.
if [ "${PD_PREPARE_STEP:-part}" = merge ]; then
  n=${PD_PREPARE_PARTS:?}
  parts=()
  for ((i = 0; i < n; i++)); do parts+=("$(part_dir "$i" "$n")"); done
  log "job $SLURM_JOB_ID: merge $n parts from $PARTS_DIR into $OUT"
  rc=0
  "$PYTHON" launcher/prepare_data.py --merge "${parts[@]}" --out "$OUT" || rc=$?
  log "merge exited with $rc"
  exit "$rc"
fi

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "submit as an array job, one part per task: sbatch --array=0-<N-1> slurm/prepare_array.sh ..."
i=$SLURM_ARRAY_TASK_ID
n=${SLURM_ARRAY_TASK_COUNT:-0}
first=${SLURM_ARRAY_TASK_MIN:-?}
last=${SLURM_ARRAY_TASK_MAX:-?}
# Parts are numbered 0..N-1: a gap (--array=0-7:2) would leave parts that no task prepares.
if [ "$n" -lt 1 ] || [ "$first" != 0 ] || [ "$last" != $((n - 1)) ]; then
  die "--array must be 0-<N-1> with step 1, one task per part (got tasks $first-$last, $n in all)"
fi
merge_cmd="$PYTHON launcher/prepare_data.py --merge $PARTS_DIR/part-*-of-$(printf %05d "$n") --out $OUT"

if [ "$i" = 0 ] && [ "$MERGE" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  # Submitted without this task's array variables: Slurm would pass them on to the merge job's environment.
  merge_args=(--parsable --job-name="${SLURM_JOB_NAME}-merge" --dependency="afterok:$SLURM_ARRAY_JOB_ID"
              --kill-on-invalid-dep=yes --nodes=1 --ntasks=1 --cpus-per-task=2 --mem=16G --time=02:00:00
              --chdir="$START_DIR" --output=%x-%j.out --error=%x-%j.err)
  if [ -n "${SLURM_JOB_PARTITION:-}" ]; then merge_args+=(--partition="$SLURM_JOB_PARTITION"); fi
  if [ -n "${SLURM_JOB_ACCOUNT:-}" ] && [ "$SLURM_JOB_ACCOUNT" != "(null)" ]; then
    merge_args+=(--account="$SLURM_JOB_ACCOUNT")
  fi
  if merge_job=$(env -u SLURM_ARRAY_TASK_ID -u SLURM_ARRAY_JOB_ID -u SLURM_ARRAY_TASK_COUNT \
                     -u SLURM_ARRAY_TASK_MIN -u SLURM_ARRAY_TASK_MAX -u SLURM_ARRAY_TASK_STEP \
                     PD_PREPARE_STEP=merge PD_PREPARE_PARTS="$n" PARTS_DIR="$PARTS_DIR" OUT="$OUT" \
                     PASCAL_DIST_HOME="$PASCAL_DIST_HOME" \
                     sbatch "${merge_args[@]}" "$PASCAL_DIST_HOME/slurm/prepare_array.sh"); then
    log "merge job ${merge_job%%;*} submitted: it runs once all $n parts have succeeded"
  else
    log "could not submit the merge job; once every part is done, run: $merge_cmd"
  fi
elif [ "$i" = 0 ] && [ "$MERGE" != 1 ]; then
  log "MERGE=$MERGE: once every part is done, run: $merge_cmd"
fi

out=$(part_dir "$i" "$n")
mkdir -p "$PARTS_DIR"
workers=${WORKERS:-${SLURM_CPUS_PER_TASK:-}}
args=("$@" --part "$i/$n" --out "$out")
if [ -n "$workers" ]; then args+=(--workers "$workers"); fi
log "job ${SLURM_ARRAY_JOB_ID}_$i: part $i/$n on ${SLURMD_NODENAME:-$(hostname)}, ${workers:-all} worker(s) -> $out"
log "checkout $PASCAL_DIST_HOME ($(git -C "$PASCAL_DIST_HOME" rev-parse --short HEAD 2>/dev/null || echo no git))"
rc=0
"$PYTHON" launcher/prepare_data.py "${args[@]}" || rc=$?
log "part $i/$n exited with $rc"
exit "$rc"
