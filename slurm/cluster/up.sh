#!/bin/bash
# Start a throwaway two-node Slurm cluster (munged, slurmctld, slurmd n1 and n2) on this host, for CI.
#
#   slurm/cluster/up.sh DIR CTLD_PORT NODE_PORT     then: export SLURM_CONF=DIR/slurm.conf; ...; down.sh DIR
#
# Owns the cluster's start-up; tests/integration/slurm_cluster.py owns choosing DIR and the ports and always calling
# down.sh. Everything the cluster writes (config, munge key and socket, state, logs, pid files) lives
# under DIR, and the ports are parameters, so two clusters (two test sessions) on one host do not meet.
# Both nodes are slurmd processes on this host (Debian's slurmd supports several per host, one port
# each: NODE_PORT for n1, NODE_PORT+1 for n2), so they share one filesystem, as a cluster's nodes share
# their network filesystem. Needs root (slurmd, mknod) and Debian's slurmctld slurmd slurm-client munge.
# Exit status 0 once `sinfo` shows both nodes idle; otherwise 1 after at most ~20 s, with the logs.
set -euo pipefail
if [ $# -ne 3 ]; then echo "usage: $0 DIR CTLD_PORT NODE_PORT" >&2; exit 2; fi
R=$(realpath -m "$1"); CTLD_PORT=$2; NODE_PORT1=$3; NODE_PORT2=$(($3 + 1))
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
H=$(hostname -s)
mkdir -p "$R/state" "$R/log" "$R/spool/n1" "$R/spool/n2" "$R/gpu"

[ -f "$R/munge.key" ] || mungekey -c -k "$R/munge.key"
munged -S "$R/munge.sock" --key-file="$R/munge.key" --pid-file="$R/munged.pid" \
       --seed-file="$R/munged.seed" --log-file="$R/log/munged.log"

# Eight stand-in GPU device files per node (same major/minor as /dev/null): the gres plugin only needs
# files to exist; jobs see CUDA_VISIBLE_DEVICES=0..7 but no CUDA, and pascal-dist falls back to CPU/gloo.
for i in 0 1 2 3 4 5 6 7; do [ -e "$R/gpu/nvidia$i" ] || mknod "$R/gpu/nvidia$i" c 1 3; done

sed -e "s|@HOST@|$H|g" -e "s|@DIR@|$R|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@NODE_PORT1@|$NODE_PORT1|g" -e "s|@NODE_PORT2@|$NODE_PORT2|g" "$HERE/slurm.conf.in" > "$R/slurm.conf"
printf 'AutoDetect=off\nName=gpu File=%s/gpu/nvidia[0-7]\n' "$R" > "$R/gres.conf"
export SLURM_CONF=$R/slurm.conf

# Jobs use MASTER_ADDR=<first node name> as on a real cluster, so the node names must resolve here.
grep -qE '^127\.0\.0\.1[[:space:]]+n1[[:space:]]+n2[[:space:]]*$' /etc/hosts || echo '127.0.0.1 n1 n2' >> /etc/hosts

slurmctld -i            # -i: ignore any saved state; every cluster starts empty
slurmd -N n1
slurmd -N n2
for _ in $(seq 100); do
  [ "$(sinfo -h -o '%T %D' 2>/dev/null)" = "idle 2" ] && exit 0
  sleep 0.2
done
echo "slurm/cluster/up.sh: nodes not idle after 20 s" >&2
sinfo -N >&2 || true
tail -n 20 "$R"/log/*.log >&2 || true
exit 1
