#!/bin/bash
# Stop the cluster that slurm/cluster/up.sh started in DIR: cancel its jobs, then the daemons, by pid file.
#
#   slurm/cluster/down.sh DIR
#
# Safe to run twice and after a failed start. Jobs are cancelled first (while slurmctld and slurmd are
# still there to deliver it) so no training process outlives the cluster; every wait is bounded, and a
# daemon still alive after 10 s gets SIGKILL. Only processes named in DIR's pid files are touched.
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 DIR" >&2; exit 2; fi
R=$(realpath -m "$1")
export SLURM_CONF=$R/slurm.conf

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$R/slurmctld.pid"; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086  # one argument per job id
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

pids=()
for f in "$R/slurmd-n1.pid" "$R/slurmd-n2.pid" "$R/slurmctld.pid" "$R/munged.pid"; do
  if alive "$f"; then pid=$(cat "$f"); kill "$pid" 2>/dev/null; pids+=("$pid"); fi
done
for _ in $(seq 50); do
  left=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  [ ${#left[@]} -eq 0 ] && exit 0
  sleep 0.2
done
for pid in "${left[@]}"; do kill -9 "$pid" 2>/dev/null; done
exit 0
