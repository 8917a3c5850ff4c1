#!/usr/bin/env bash
# A multi-node SLURM cluster emulated on one Linux machine, for tests/test_slurm_multinode.py.
#
# Each emulated node nI is a network + UTS + mount namespace with its own host name, its own address on a
# private bridge (one veth pair per node; no route to anything else), its own /etc/hosts, its own boot id
# (so that MPI libraries see separate machines and use TCP, not shared memory) and its own /dev/shm (so that
# MPICH's segments are per node, as on a real cluster). One slurmd runs in each node; one slurmctld runs in the
# host's namespace on its own ports, state directory and ClusterName, beside the one-node cluster of
# .ci/slurm_up.sh. Needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN.
#
#   .ci/multinode_up.sh up [N]          bring up N nodes (default $MN_NODES or 2); a running cluster of N is kept
#   .ci/multinode_up.sh down            cancel its jobs, stop its daemons, remove its namespaces and bridge
#   .ci/multinode_up.sh status          sinfo of the emulated cluster
#   .ci/multinode_up.sh exec NODE CMD   run CMD inside NODE (like `ssh NODE CMD`, in the current directory)
#   .ci/multinode_up.sh check           a 4 MB Allreduce between n1 and n2 must cross n2's veth (python with
#                                       mpi4py on PATH)
#   .ci/multinode_up.sh launcher        print a fake ssh for `mpiexec -launcher ssh -launcher-exec FILE`
#
# Clients use this cluster only with   export SLURM_CONF=$MN_STATE/etc/slurm.conf   (printed by `up`).
# Settings (environment): MN_STATE (/var/tmp/mpi_afl-mn), MN_NODES (2), MN_NET (10.77.0: bridge .1, node i
# .(10+i)), MN_CPUS (CPUs declared per node, 16), MN_GPUS (count-only GPUs per node, 8), MN_PORT (slurmctld
# port, 7817; slurmd MN_PORT+1), MN_SHM (size of each node's /dev/shm, 2g), MN_FIRST_JOB_ID (100001).
set -euo pipefail
STATE=${MN_STATE:-/var/tmp/mpi_afl-mn}
NET=${MN_NET:-10.77.0}
CPUS=${MN_CPUS:-16}
GPUS=${MN_GPUS:-8}
PORT=${MN_PORT:-7817}
SHM=${MN_SHM:-2g}
BRIDGE=mnbr0
# shellcheck source=.ci/slurm_common.sh
. "$(dirname "$0")/slurm_common.sh"
HOST=$(hostname -s)
CONF=$STATE/etc/slurm.conf

say() { echo "multinode_up: $*"; }
die() { echo "multinode_up: error: $*" >&2; exit 1; }

holder_pid() { cat "$STATE/node/$1.pid" 2>/dev/null; }
node_up() { local p; p=$(holder_pid "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
known_nodes() { ls "$STATE/node" 2>/dev/null | sed -n 's/\.pid$//p' | sort -V; }
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Run a command inside a node's namespaces, in the caller's working directory.
on_node() {
    local node=$1; shift
    node_up "$node" || die "node $node is not up ($0 up)"
    nsenter -t "$(holder_pid "$node")" -n -u -m --wd="$PWD" -- "$@"
}

write_conf() {   # $1 = nodes; writes slurm.conf to stdout
    cat <<EOF
ClusterName=mpi-afl-mn
# Job ids far from the one-node cluster's: MPICH names its shared memory after the PMI job id (JOBID.STEP) only.
FirstJobId=${MN_FIRST_JOB_ID:-100001}
SlurmctldHost=$HOST($NET.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
$(slurm_conf_common)
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SchedulerType=sched/backfill
NodeName=DEFAULT CPUs=$CPUS RealMemory=8000 Gres=gpu:$GPUS State=UNKNOWN
EOF
    local i
    for i in $(seq "$1"); do echo "NodeName=n$i NodeHostname=n$i NodeAddr=$NET.$((10 + i))"; done
    echo "PartitionName=gpu Nodes=n[1-$1] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:16"
    echo "PartitionName=debug Nodes=n[1-$1] MaxTime=INFINITE State=UP OverSubscribe=FORCE:16"
}

start_munge() {
    mkdir -p /run/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key /run/munge
    chmod 400 /etc/munge/munge.key
    if ! pgrep -x munged >/dev/null; then
        su -s /bin/sh munge -c /usr/sbin/munged
        touch "$STATE/started-munged"   # `down` stops only a munged it started
    fi
    local _
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged does not answer"
}

# One node: its network namespace and veth, then a holder process that owns its UTS and mount namespaces.
start_node() {
    local i=$1 node=n$1
    [ -e "/run/netns/mn-$node" ] || ip netns add "mn-$node"
    ip link show "mn-$node" >/dev/null 2>&1 || ip link add "mn-$node" type veth peer name eth0 netns "mn-$node"
    ip link set "mn-$node" master "$BRIDGE" up
    ip -n "mn-$node" addr replace "$NET.$((10 + i))/24" dev eth0
    ip -n "mn-$node" link set eth0 up
    ip -n "mn-$node" link set lo up
    [ -s "$STATE/etc/boot_id-$node" ] || cat /proc/sys/kernel/random/uuid > "$STATE/etc/boot_id-$node"
    node_up "$node" && return 0
    # nsenter --net, not `ip netns exec`: the latter remounts /sys and hides /sys/fs/cgroup, which slurmd needs.
    setsid nsenter --net="/run/netns/mn-$node" -- unshare --uts --mount --propagation private -- \
        sh -c "hostname $node &&
               mount --bind '$STATE/etc/hosts' /etc/hosts &&
               mount --bind '$STATE/etc/boot_id-$node' /proc/sys/kernel/random/boot_id &&
               mount -t tmpfs -o mode=1777,size=$SHM tmpfs /dev/shm &&
               echo \$\$ > '$STATE/node/$node.pid' && exec sleep infinity" \
        </dev/null >"$STATE/log/holder-$node.log" 2>&1 &
    local _
    for _ in $(seq 50); do node_up "$node" && return 0; sleep 0.1; done
    die "node $node did not start: $(cat "$STATE/log/holder-$node.log")"
}

up() {
    local n=${1:-${MN_NODES:-2}} i
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "the node count must be a positive integer, not '$n'"
    [ "$(id -u)" = 0 ] || die "needs root (network, UTS and mount namespaces)"
    local running=""
    pid_alive "$STATE/slurmctld.pid" && running=1
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq slurm-wlm munge libpmix2 >/dev/null
    fi
    mkdir -p "$STATE"/{etc,state,log,spool,node,gpu}
    if [ -n "$running" ] && ! cmp -s <(write_conf "$n") "$CONF"; then
        die "the emulated cluster runs with another configuration ($(grep -c '^NodeName=n' "$CONF") nodes):" \
            "$0 down first"
    fi
    for i in $(seq 0 $((GPUS - 1))); do touch "$STATE/gpu/nvidia$i"; done
    start_munge
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge \
        || die "cannot create a bridge (CAP_NET_ADMIN missing?)"
    ip addr replace "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 $HOST"
        for i in $(seq "$n"); do echo "$NET.$((10 + i)) n$i"; done
    } > "$STATE/etc/hosts"
    for i in $(seq "$n"); do start_node "$i"; done
    write_conf "$n" > "$CONF"
    echo "NodeName=n[1-$n] Name=gpu File=$STATE/gpu/nvidia[0-$((GPUS - 1))]" > "$STATE/etc/gres.conf"
    export SLURM_CONF=$CONF
    [ -n "$running" ] || slurmctld -i -f "$CONF"
    for i in $(seq "$n"); do
        mkdir -p "$STATE/spool/n$i"
        pid_alive "$STATE/slurmd-n$i.pid" || on_node "n$i" slurmd -f "$CONF" -N "n$i"
    done
    local _
    for _ in $(seq 60); do
        if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -Ec ' (idle|mixed|allocated)$')" -ge "$n" ]; then
            say "$n nodes up; use: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 1
    done
    sinfo -N >&2 || true
    die "the nodes did not come up; see $STATE/log/"
}

down() {
    export SLURM_CONF=$CONF
    local node pid
    if pid_alive "$STATE/slurmctld.pid"; then
        timeout 20 scancel --full --quiet --user=root 2>/dev/null || true
        sleep 2
    fi
    for node in $(known_nodes); do
        pid=$(cat "$STATE/slurmd-$node.pid" 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    pid=$(cat "$STATE/slurmctld.pid" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    sleep 1
    for node in $(known_nodes); do
        pid=$(holder_pid "$node" || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        rm -f "$STATE/node/$node.pid"
        ip link del "mn-$node" 2>/dev/null || true
        ip netns del "mn-$node" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if [ -e "$STATE/started-munged" ]; then
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        rm -f "$STATE/started-munged"
    fi
    say "down (state and logs kept in $STATE)"
}

# Two ranks on n1 and n2 through srun; the bytes that left n2 over its veth show that MPI used the network
# (a few KB only would mean it found a shared-memory path between the "nodes").
check() {
    export SLURM_CONF=$CONF
    local stats=/sys/class/net/mn-n2/statistics/tx_bytes before after
    [ -e "$stats" ] || die "node n2 is not up ($0 up 2)"
    before=$(cat "$stats")
    # ofi, as mpi_afl.slurm chooses across nodes: ucx's PMI-1 lines can exceed the 1024 bytes that SLURM's pmi2
    # plug-in reads at once (mpi_afl/slurm.py, pmi1_line_env)
    MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi} timeout 300 srun --mpi=pmi2 -N 2 --ntasks-per-node=1 python -c '
from mpi4py import MPI
import numpy as np, socket
c = MPI.COMM_WORLD
x = np.full(1 << 20, c.rank, np.float32); y = np.empty_like(x); c.Allreduce(x, y)
hosts = c.gather(socket.gethostname())
ok = "ok" if y[0] == sum(range(c.size)) else "WRONG"
if c.rank == 0: print("multinode_up: world", c.size, "on", hosts, "allreduce", ok)'
    after=$(cat "$stats")
    say "$((after - before)) bytes left n2 over its veth (a 4 MB Allreduce: expect > 4000000)"
    [ $((after - before)) -gt 4000000 ]
}

# A fake ssh for hydra: `mpiexec -launcher ssh -launcher-exec FILE -hosts n1,n2 ...` runs FILE [options] HOST CMD.
launcher() {
    cat > "$STATE/node-ssh" <<EOF
#!/bin/sh
# ssh stand-in for the emulated nodes: skips ssh options, runs the command inside the node's namespaces.
while [ "\${1#-}" != "\$1" ]; do shift; done
node=\$1; shift
exec nsenter -t "\$(cat '$STATE/node/'\$node.pid)" -n -u -m --wd="\$PWD" -- sh -c "\$*"
EOF
    chmod +x "$STATE/node-ssh"
    echo "$STATE/node-ssh"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo -N ;;
    exec) shift; [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."; on_node "$@" ;;
    check) check ;;
    launcher) launcher ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
