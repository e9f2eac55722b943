#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (loopback only), for the Slurm launcher tests.
#
# Installs slurmctld, slurmd, the client tools and munge from the distribution (Debian/Ubuntu apt)
# when missing, writes a munge key and a one-node, one-partition slurm.conf for this machine, starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. Needs root. Idempotent:
# re-running it with the cluster up only checks it. Stop it with scripts/slurm/stop.sh.
# There is no accounting database, so `sacct` fails: submitit then logs "Bypassing sacct error" and
# reads each job's result from its .submitit folder instead, which is all a sweep needs.
#
# Environment:
#   VLM_ADAPT_SLURM_DIR   state, spool, pid and log files (default /tmp/vlm_adapt_slurm)
#   VLM_ADAPT_SLURM_WAIT  seconds to wait for the node to become idle (default 60)
set -euo pipefail

STATE_DIR=${VLM_ADAPT_SLURM_DIR:-/tmp/vlm_adapt_slurm}
WAIT_S=${VLM_ADAPT_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by vlm_adapt scripts/slurm/start.sh"
PARTITION=debug

say() { echo "[slurm/start] $*"; }
die() { echo "[slurm/start] error: $*" >&2; exit 1; }

node_idle() {
    timeout 10 sinfo --noheader --partition "$PARTITION" --format '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts system daemons): sudo bash $0"

if command -v sinfo >/dev/null && [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF" && node_idle; then
    say "cluster already up:"; sinfo; exit 0
fi

# ---------------------------------------------------------------- packages
missing=()
for cmd in slurmctld slurmd sinfo sbatch munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and munge by hand"
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$STATE_DIR"/{state,spool,log}

# ---------------------------------------------------------------- munge (reused when already running)
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "writing /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force  # --force: a stale socket of a killed munged is fine
    touch "$STATE_DIR/munged.started"  # stop.sh stops only a munged that this script started
    for _ in $(seq 20); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.5; done
    (munge -n | unmunge) >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- slurm.conf
if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
fi
HOST=$(hostname -s)
# `slurmd -C` prints this machine's NodeName line (CPUs, sockets, cores, RealMemory) as slurmd sees it
NODE_LINE=$(slurmd -C | head -n 1)
[[ $NODE_LINE == NodeName=* ]] || die "slurmd -C did not describe this node: $NODE_LINE"
mkdir -p /etc/slurm
cat > "$CONF" <<CONF_EOF
$MARKER
# Single-node cluster on loopback for tests; state under $STATE_DIR.
ClusterName=vlmadapt
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF_EOF
say "wrote $CONF for node $HOST"

# ---------------------------------------------------------------- daemons
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running "$STATE_DIR/slurmctld.pid"; then
    say "starting slurmctld"
    slurmctld -f "$CONF"   # keeps its saved state: a restart finds the jobs it had
fi
if ! running "$STATE_DIR/slurmd.pid"; then
    say "starting slurmd"
    slurmd -f "$CONF"
fi

for ((i = 0; i < WAIT_S; i++)); do
    if node_idle; then say "cluster up:"; sinfo; exit 0; fi
    # a node left DOWN/DRAINED by an earlier run comes back once resumed
    if timeout 10 sinfo --noheader --format '%t' 2>/dev/null | grep -qE '^(down|drain)'; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
sinfo || true
die "node $HOST not idle after ${WAIT_S}s; logs: $STATE_DIR/log/"
