#!/usr/bin/env bash
# Stops exactly the daemons one call of scripts/ci/slurm_up.sh [PIDS] started (their pids are in
# PIDS), and nothing else: a Slurm or munged that was already running is left alone.
set -uo pipefail
DIR=${MIMSCALE_SLURM_DIR:-/tmp/mimscale-slurm}
PIDS=${1:-$DIR/started.pids}   # what slurm_up.sh [PIDS] started
[ -s "$PIDS" ] || { echo "slurm_down: nothing started by slurm_up.sh"; exit 0; }
# Jobs still on this test cluster would outlive its daemons: cancel them first.
if grep -q '^slurmctld ' "$PIDS"; then
    jobs=$(SLURM_CONF=$DIR/slurm.conf squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        echo "slurm_down: cancelling jobs $jobs"
        # shellcheck disable=SC2086
        SLURM_CONF=$DIR/slurm.conf scancel $jobs
        for _ in $(seq 30); do [ -z "$(SLURM_CONF=$DIR/slurm.conf squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
    fi
fi
tac "$PIDS" | while read -r name pid; do
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "slurm_down: stopped $name ($pid)"
    fi
done
: >"$PIDS"
