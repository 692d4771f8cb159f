#!/usr/bin/env bash
# A real single-node Slurm on this machine, from Debian's packages (slurm-wlm, munge).
#   sudo scripts/local_slurm.sh start    # install if needed, configure, start munged/slurmctld/slurmd
#   sudo scripts/local_slurm.sh status
#   sudo scripts/local_slurm.sh stop     # stop the daemons (the configuration is kept)
#   scripts/local_slurm.sh config        # print the slurm.conf that start writes (changes nothing)
# The node is sized to this machine: the CPUs this process may use (whatever OMP_NUM_THREADS says),
# memory from /proc/meminfo. Accounting is not configured, so sacct fails and submitit warns about
# it, but jobs, arrays and requeue work.
set -euo pipefail

conf_dir=/etc/slurm
state_dir=/var/spool/slurmctld
spool_dir=/var/spool/slurmd
log_dir=/var/log/slurm

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "local_slurm.sh: must run as root (it installs packages and starts system daemons)" >&2
        exit 1
    fi
}

install_packages() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        echo "[local_slurm] installing slurm-wlm and munge" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
}

cpu_count() {  # the CPUs this process may use; nproc alone follows OMP_NUM_THREADS (1: 2-task jobs pend forever)
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

slurm_conf() {  # the configuration, on stdout
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(cpu_count)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat <<EOF
# Written by RePa-SSL scripts/local_slurm.sh: a one-node cluster for tests and local runs.
ClusterName=repa-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
StateSaveLocation=$state_dir
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

write_config() {
    mkdir -p "$conf_dir" "$state_dir" "$spool_dir" "$log_dir"
    rm -f "$conf_dir/cgroup.conf"  # no cgroups here: proctrack/linuxproc and task/none
    slurm_conf > "$conf_dir/slurm.conf"
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
    fi
    for _ in $(seq 1 40); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "local_slurm.sh: munged did not start; see /var/log/munge/munged.log" >&2
    return 1
}

alive() {  # a live (non-zombie) process of that name exists
    ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'
}

terminate() {  # $1 name, $2 pid file: SIGTERM the daemon this script started, wait up to 10 s, then SIGKILL
    local pid=""
    [ -s "$2" ] && pid=$(cat "$2")
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        pid=$(pgrep -x -o "$1" || true)  # no (valid) pid file: the oldest process of that name
    fi
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    sleep 0.5
}

wait_for_node() {
    for _ in $(seq 1 120); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.5
    done
    echo "local_slurm.sh: the node did not become idle; see $log_dir/slurmctld.log and slurmd.log" >&2
    sinfo >&2 || true
    return 1
}

start() {
    need_root
    install_packages
    write_config
    start_munge
    if alive slurmctld; then
        scontrol reconfigure >/dev/null 2>&1 || true  # running already: apply the configuration just written
    else
        /usr/sbin/slurmctld
    fi
    alive slurmd || /usr/sbin/slurmd
    wait_for_node
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    sinfo
}

stop() {
    need_root
    scontrol shutdown >/dev/null 2>&1 || true
    terminate slurmd /run/slurmd.pid
    terminate slurmctld /run/slurmctld.pid
    terminate munged /run/munge/munged.pid
    echo "[local_slurm] stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    config) slurm_conf ;;
    -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0" ;;
    *) echo "usage: $0 start|status|stop|config" >&2; exit 2 ;;
esac
