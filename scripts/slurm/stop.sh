#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by scripts/slurm/start.sh: cancel its jobs, stop
# slurmd and slurmctld (by the pid files it wrote), then munged if start.sh started it.
# Idempotent: safe when nothing runs. Needs the same VLM_ADAPT_SLURM_DIR as start.sh.
set -uo pipefail

STATE_DIR=${VLM_ADAPT_SLURM_DIR:-/tmp/vlm_adapt_slurm}
say() { echo "[slurm/stop] $*"; }

stop_pidfile() {  # name pidfile: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

# cancel jobs only on the cluster start.sh configured, never on a real one
if grep -qF "# written by vlm_adapt scripts/slurm/start.sh" /etc/slurm/slurm.conf 2>/dev/null \
        && timeout 10 sinfo >/dev/null 2>&1; then
    scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
fi
stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
if [[ -f $STATE_DIR/munged.started ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$STATE_DIR/munged.started"
fi
say "stopped"
