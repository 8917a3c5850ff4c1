#!/usr/bin/env bash
# Bring up a one-node SLURM (munge, slurmctld, slurmd) on this machine, for the tests that submit the real
# jobs/ scripts (tests/test_slurm_jobs.py). Needs root and apt; idempotent (a running cluster is left alone).
#   .ci/slurm_up.sh            install if needed, write /etc/slurm/slurm.conf, start the daemons, wait for the node
# Settings a container needs: no cgroups (proctrack/linuxproc, task/none), more declared CPUs than the hardware
# has (config_overrides) so 17 ranks fit, 32 count-only GPUs (gres.conf on empty files, slurmd accepts the
# count; the tests run several 4-GPU jobs at once),
# and MpiDefault=none, SLURM's default, so the job scripts must pass --mpi to srun themselves.
set -euo pipefail
STATE=${MPI_AFL_SLURM_STATE:-/var/tmp/mpi_afl-slurm}
HOST=$(hostname -s)
# shellcheck source=.ci/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # libpmix2 only silences slurmd's "mpi/pmix_v4: can not load PMIx library"
    apt-get install -y -qq slurm-wlm munge libpmix2 >/dev/null
fi

if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    echo "slurm_up: SLURM already running on $HOST"
    exit 0
fi

mkdir -p "$STATE"/{state,spool,log,gpu} /etc/slurm /run/munge
touch "$STATE"/gpu/nvidia{0..31}
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=mpi-afl-ci
SlurmctldHost=$HOST
$(slurm_conf_common)
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerType=sched/backfill
NodeName=$HOST CPUs=64 RealMemory=20000 Gres=gpu:32 State=UNKNOWN
PartitionName=gpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:16
PartitionName=debug Nodes=$HOST MaxTime=INFINITE State=UP OverSubscribe=FORCE:16
EOF
echo "NodeName=$HOST Name=gpu File=$STATE/gpu/nvidia[0-31]" > /etc/slurm/gres.conf

# Its own daemons, by their pid files (another cluster's, e.g. .ci/multinode_up.sh's, may run beside them)
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running "$STATE/slurmctld.pid" || slurmctld -i
running "$STATE/slurmd.pid" || slurmd
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)' && { echo "slurm_up: SLURM up on $HOST"; exit 0; }
    sleep 1
done
echo "slurm_up: the node did not come up; see $STATE/log/" >&2
sinfo >&2 || true
exit 1
