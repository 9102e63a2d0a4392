#!/usr/bin/env bash
# A one-node Slurm on this machine, for the tests in tests/slurm/ (CI runs this as root).
#
#   sudo scripts/ci/slurm_up.sh [PIDS]     # installs slurm-wlm + munge if missing, starts them
#   export SLURM_CONF=/tmp/mimscale-slurm/slurm.conf
#   scripts/ci/slurm_down.sh [PIDS]        # stops exactly what that call started
#
# PIDS (default $MIMSCALE_SLURM_DIR/started.pids) lists the daemons this call started, and nothing
# when it found them already up, so a second user's slurm_down.sh never stops the first one's.
#
# Everything lives under $MIMSCALE_SLURM_DIR (default /tmp/mimscale-slurm): the config, spool and
# state directories, the daemons' logs and pid files. /etc/slurm is not touched, so a machine that
# already runs a Slurm keeps its own; munged is started only if none is running.
# No cgroups (a container usually has none to give): proctrack/linuxproc, task/none. The
# partition lets up to 4 jobs share a CPU (OverSubscribe=FORCE:4), so two 2-rank test jobs run
# at once on a 2-core machine.
set -euo pipefail

DIR=${MIMSCALE_SLURM_DIR:-/tmp/mimscale-slurm}
PIDS=${1:-$DIR/started.pids}
export SLURM_CONF=$DIR/slurm.conf
mkdir -p "$DIR"/{state,spool,log}
: >"$PIDS"

if SLURM_CONF=$SLURM_CONF timeout 5 sinfo -h >/dev/null 2>&1; then
    echo "slurm_up: a Slurm answering to $SLURM_CONF is already up; leaving it as it is"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" -eq 0 ] || { echo "slurm_up: slurm-wlm/munge are not installed and this is not root" >&2; exit 1; }
    echo "slurm_up: installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >"$DIR/log/apt.log" 2>&1 \
        || { tail -20 "$DIR/log/apt.log" >&2; exit 1; }
fi

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS (the tests set 1)
cat >"$SLURM_CONF" <<CONF
# written by scripts/ci/slurm_up.sh: a one-node test cluster
ClusterName=mimscale-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# A cancelled or timed-out job gets SIGTERM, then SIGKILL this many seconds later: Slurm's default
# (it was 10 here; on a loaded 2-core CI machine a cancelled job's save, exit and its script's last
# line took longer once, and the line was lost to the SIGKILL).
KillWait=30
# Finished jobs stay visible to squeue/scontrol this long (the tests read their states).
MinJobAge=600
SchedulerParameters=sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || mungekey --create 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chmod 400 /etc/munge/munge.key
    munged --force --pid-file="$DIR/munged.pid"
    for _ in $(seq 50); do [ -s "$DIR/munged.pid" ] && break; sleep 0.1; done
    echo "munged $(cat "$DIR/munged.pid")" >>"$PIDS"
fi

slurmctld -c -f "$SLURM_CONF"   # -c: no jobs left over from an earlier test cluster
slurmd -f "$SLURM_CONF"
for _ in $(seq 50); do [ -s "$DIR/slurmctld.pid" ] && [ -s "$DIR/slurmd.pid" ] && break; sleep 0.2; done
echo "slurmctld $(cat "$DIR/slurmctld.pid")" >>"$PIDS"
echo "slurmd $(cat "$DIR/slurmd.pid")" >>"$PIDS"

for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "slurm_up: node $host idle ($cpus CPUs); export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm_up: node $host did not become idle within 60 s (state: '${state:-none}'); see $DIR/log/" >&2
tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
exit 1
