#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for CI and for trying profiles/slurm (run as root).
#
#   .ci/slurm_cluster.sh up      install Debian's slurm packages if missing, start munged, slurmctld, slurmd
#   .ci/slurm_cluster.sh down    cancel every job, stop the daemons by the PIDs `up` recorded, unlink slurm.conf
#
# State (slurm.conf, logs, spool, PID files) lives in $SLURM_CI_DIR (default /tmp/dejavu-slurm); `up` is
# idempotent: a cluster already up from that directory is left as it is. /etc/slurm/slurm.conf links to the
# state's slurm.conf: SLURM_CONF would not do, the plugin's job step drops SLURM_* variables before its srun.
# The cluster: no accounting (sacct fails, so status polling must use squeue: MinJobAge keeps finished
# jobs visible to it, for an hour), no cgroups (proctrack/linuxproc, task/none), no GPUs (a GPU request fails at submit),
# one node `localhost` in one default partition `debug`. The node advertises at least 64 GB so the memory
# requests of profiles/slurm (sized for real clusters) schedule; memory is not a consumable nor enforced here.
set -euo pipefail

STATE=${SLURM_CI_DIR:-/tmp/dejavu-slurm}
CONF=$STATE/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
PIDS=$STATE/pids
MIN_MEMORY_MB=65536

alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

recorded_pids() { [[ -f $PIDS ]] && cut -d' ' -f2 "$PIDS" || true; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local cpus memory
    cpus=$(nproc)
    memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
    (( memory < MIN_MEMORY_MB )) && memory=$MIN_MEMORY_MB
    mkdir -p "$STATE/ctld" "$STATE/spool"
    cat >"$CONF" <<EOF
ClusterName=dejavu-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
ReturnToService=2
EnforcePartLimits=ALL
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
        echo "slurm_cluster: $SYSTEM_CONF exists and is not this script's link: not touching a real cluster" >&2
        exit 1
    fi
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

wait_for_idle_node() {
    for _ in $(seq 60); do
        [[ $(sinfo -h -N -o %T 2>/dev/null) == idle ]] && return
        sleep 1
    done
    echo "slurm_cluster: node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
    sinfo -N -l >&2 || true
    exit 1
}

up() {
    if [[ -f $PIDS ]] && all_alive && sinfo -h >/dev/null 2>&1; then
        echo "slurm_cluster: already up ($STATE)"
        return
    fi
    [[ -f $PIDS ]] && down
    install_packages
    write_config
    : >"$PIDS"
    install -d -o munge -g munge -m 0755 /run/munge
    # One munged per machine: reuse a running one (then `down` leaves it running too).
    if ! alive "$(cat "$MUNGE_PID" 2>/dev/null)"; then
        runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
        echo "munged $(cat "$MUNGE_PID")" >>"$PIDS"
    fi
    /usr/sbin/slurmctld -D -i -f "$CONF" >>"$STATE/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >>"$PIDS"
    /usr/sbin/slurmd -D -N localhost -f "$CONF" >>"$STATE/slurmd.out" 2>&1 &
    echo "slurmd $!" >>"$PIDS"
    wait_for_idle_node
    echo "slurm_cluster: up ($STATE): $(sinfo -h -o '%P %D %c CPUs %m MB')"
}

all_alive() {
    local pid
    for pid in $(recorded_pids); do alive "$pid" || return 1; done
}

down() {
    [[ -f $PIDS ]] || { echo "slurm_cluster: not up ($STATE)"; return; }
    scancel --full --user "$(id -un)" 2>/dev/null || true
    local pid
    for pid in $(recorded_pids | tac); do  # slurmd, slurmctld, then munged
        alive "$pid" && kill "$pid"
        for _ in $(seq 20); do alive "$pid" || break; sleep 0.5; done
        alive "$pid" && kill -KILL "$pid"
    done
    rm -f "$PIDS"
    [[ $(readlink "$SYSTEM_CONF") == "$CONF" ]] && rm -f "$SYSTEM_CONF"  # slurm commands then fail at once
    echo "slurm_cluster: down ($STATE)"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
