# shellcheck shell=bash
# The launch that slurm/a100x1.sh, slurm/a100x8.sh and slurm/multinode.sh share; sourced, never run.
#
# Owns: the job's environment (setup hook, rendezvous address, threads), the `srun` launch of
# launcher/train.py, and requeue after a preemption. The three scripts own only their #SBATCH lines, so
# one node and many nodes run the same code path, the one the CI cluster test (tests/integration/test_slurm.py) runs.
#
# Design: one `srun` task per GPU. Slurm starts every rank itself and gives each its SLURM_PROCID,
# SLURM_LOCALID and SLURM_NTASKS, which pascal_dist.train.dist_env reads; there is no ssh, no hostfile and no
# second launcher (the DeepSpeed launcher inside a job needs both, and its flags are not srun's). The
# batch shell computes only job-wide values (MASTER_ADDR, MASTER_PORT); nothing per-rank is expanded
# here, which avoids the classic bug of $SLURM_NODEID/$SLURM_PROCID expanded once, in the batch shell,
# so that every node believes it is node 0.
#
# Preemption: Slurm sends SIGUSR1 (from --signal=USR1@N before the time limit, or `scancel --signal=USR1`)
# straight to every task; each rank finishes its step, checkpoints and exits with 75 (EX_TEMPFAIL). Then
# this script runs `scontrol requeue`, and the requeued job (same job id, so the same RUN_DIR) resumes
# through `--resume auto`. Checkpoints must therefore be on a filesystem that every node and every later
# run of the job sees (RUN_DIR on shared storage, not node-local /tmp).

# Job-wide: the batch shell is not a rank. A signal meant for the ranks (scancel --full, --signal=B:...,
# the TERM of a cancel or preemption) must not kill it before it has seen srun's exit status.
trap 'echo "[slurm] batch shell: SIGUSR1 (the ranks checkpoint and stop)" >&2' USR1
trap 'echo "[slurm] batch shell: SIGTERM (the ranks checkpoint and stop)" >&2' TERM

EXIT_PREEMPTED=75  # pascal_dist.train.preemption.EXIT_PREEMPTED: stopped early with a checkpoint

pd_log() { echo "[slurm] $*"; }
pd_die() { echo "error: $*" >&2; exit 2; }

# The job's state as slurmctld sees it (RUNNING, CANCELLED, TIMEOUT, ...).
pd_job_state() {
  local info
  info=$(timeout 30 scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || return 1
  info=${info#*JobState=}
  echo "${info%% *}"
}

# After the ranks stopped with a checkpoint: put the job back in the queue, unless the stop was a cancel
# (`scontrol requeue` would happily requeue a cancelled job, and the user could never stop it) or the
# job has already been requeued MAX_RESTARTS times (a time limit shorter than start-up plus one step
# would otherwise requeue forever).
pd_requeue() {
  local state restarts=${SLURM_RESTART_COUNT:-0}
  state=$(pd_job_state) || state=unknown
  if [ "$state" != RUNNING ]; then
    pd_log "ranks checkpointed and stopped; job state $state, so not requeueing"
    return 1
  fi
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    pd_log "ranks checkpointed and stopped; already requeued $restarts times (MAX_RESTARTS), not again"
    return 1
  fi
  if timeout 60 scontrol requeue "$SLURM_JOB_ID"; then
    pd_log "requeued job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from ${RUN_DIR}/checkpoints"
    return 0
  fi
  pd_log "scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR to continue"
  return 1
}

# pd_launch [key=value ...]: set up, report where every rank runs, train, requeue if preempted.
pd_launch() {
  [ -n "${SLURM_JOB_ID:-}" ] || pd_die "submit with sbatch (SLURM_JOB_ID is not set)"
  cd "$PASCAL_DIST_HOME" || pd_die "cannot cd to PASCAL_DIST_HOME=$PASCAL_DIST_HOME"

  # Users' knobs (documented in each script's header), read from the environment sbatch passes on.
  CONFIG=${CONFIG:-}
  DS_CONFIG=${DS_CONFIG:-configs/zero2.json}
  local job_name=${SLURM_JOB_NAME%.sh}
  RUN_DIR=${RUN_DIR:-runs/${job_name}-${SLURM_JOB_ID}}
  OVERRIDES=${OVERRIDES:-}
  PYTHON=${PYTHON:-python3}
  SETUP=${SETUP:-}
  MAX_RESTARTS=${MAX_RESTARTS:-20}

  if [ -n "$SETUP" ]; then
    pd_log "setup: $SETUP"
    eval "$SETUP" || pd_die "SETUP failed: $SETUP"
  fi

  # Values left over from the submitting shell (say, one started by torchrun) would win over srun's in
  # pascal_dist.train.dist_env; each rank's own come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
  unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || pd_die "scontrol show hostnames failed"
  export MASTER_ADDR=${hosts%%$'\n'*}
  # Same rule as pascal_dist.train.dist_env: two jobs sharing a node do not pick the same port.
  export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
  # One thread per CPU Slurm gave the task, not one per core of the node per rank.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1

  # srun in a batch job does not inherit --cpus-per-task from sbatch in Slurm 22.05 to 23.02: pass it
  # on, or every rank is squeezed onto one CPU. --wait: once one rank has exited, the others
  # get 60 s to exit too (ranks that save and stop together take seconds) and are then killed, so a
  # crashed rank cannot leave its peers blocked in a collective until the time limit.
  local srun_args=(--wait=60)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

  local args=(launcher/train.py --ds_config "$DS_CONFIG" --resume auto)
  if [ -n "$CONFIG" ]; then args+=(--config "$CONFIG"); fi
  local overrides=()
  read -r -a overrides <<< "$OVERRIDES"
  # run_dir first: OVERRIDES and the script's arguments come later and win.
  args+=("train.run_dir=$RUN_DIR" "${overrides[@]}" "$@")

  pd_log "job $SLURM_JOB_ID ($job_name) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES:-?} node(s)" \
         "[$(echo "$hosts" | tr '\n' ' ' | sed 's/ $//')], $SLURM_NTASKS task(s), master $MASTER_ADDR:$MASTER_PORT"
  pd_log "checkout $PASCAL_DIST_HOME ($(git -C "$PASCAL_DIST_HOME" rev-parse --short HEAD 2>/dev/null || echo no git))"
  pd_log "train: $PYTHON ${args[*]}"

  # Preflight, one task per rank as in training: each rank reports what pascal_dist.train.dist_env makes of its
  # environment and where it runs. A node without the Python environment fails here in seconds, by name.
  # shellcheck disable=SC2016  # the Python code is single-quoted on purpose
  srun "${srun_args[@]}" "$PYTHON" -c '
import os, socket
from pascal_dist.train.dist_env import detect
e = detect()
node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
print(f"[slurm] rank {e.rank}/{e.world_size} local_rank {e.local_rank} on {node} "
      f"-> master {e.master_addr}:{e.master_port} ({e.launcher})", flush=True)
' || pd_die "preflight failed: every node must see $PASCAL_DIST_HOME and run $PYTHON with pascal_dist importable"

  local rc=0
  srun "${srun_args[@]}" "$PYTHON" "${args[@]}" || rc=$?
  if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
    pd_requeue || true  # not requeued: the job still ends with 75, "checkpointed, resumable"
    exit "$EXIT_PREEMPTED"
  fi
  pd_log "training exited with $rc"
  exit "$rc"
}
