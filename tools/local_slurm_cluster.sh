#!/usr/bin/env bash
# A 2-node SLURM cluster on this machine, for tests: `start` or `stop` (root only).
#
#   tools/local_slurm_cluster.sh start   # prints the state directory and the SLURM_CONF to export
#   export SLURM_CONF=/tmp/megatron_simreg_slurm/slurm.conf
#   sbatch -N2 --ntasks-per-node=1 --wrap hostname
#   tools/local_slurm_cluster.sh stop
#
# Uses Debian's slurm-wlm and munge (installed with apt-get when missing: one
# `apt-get update` first). Nodes n1 and n2 both run here (slurmd -N n1 / -N n2,
# ports 17001/17002, NodeAddr=127.0.0.1, 1 CPU each), partition `debug`.
# Idempotent: `start` does nothing for daemons that already answer; `stop` ends
# only the daemons this script started, by the pids it recorded in the state
# directory ($LOCAL_SLURM_DIR, default /tmp/megatron_simreg_slurm).
set -euo pipefail

STATE="${LOCAL_SLURM_DIR:-/tmp/megatron_simreg_slurm}"
CONF="$STATE/slurm.conf"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-17000}"
PIDS="$STATE/started.pids"   # "name pid" lines: the daemons this script started

log() { echo "local_slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

recorded_pid() {  # the recorded pid of a daemon we started, if it is still alive
  [ -f "$PIDS" ] || return 1
  local pid
  pid="$(awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n1)"
  alive "$pid" && echo "$pid"
}

record() { echo "$1 $2" >>"$PIDS"; }

wait_pidfile() {  # wait_pidfile FILE SECONDS -> prints the pid once the file holds a live pid
  local f="$1" t="$2" pid
  for _ in $(seq $((t * 10))); do
    if [ -s "$f" ]; then
      pid="$(tr -dc '0-9' <"$f")"
      if alive "$pid"; then echo "$pid"; return 0; fi
    fi
    sleep 0.1
  done
  return 1
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged already answers (ours from an earlier start, or the system's)
  fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
      mungekey -c -k /etc/munge/munge.key
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged --force
  local pid
  pid="$(wait_pidfile /run/munge/munged.pid 20)" || die "munged did not start (see /var/log/munge/munged.log)"
  record munged "$pid"
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged started (pid $pid) but munge/unmunge fail"
}

write_conf() {
  local host
  host="$(hostname -s)"
  mkdir -p "$STATE/ctld" "$STATE/log"
  cat >"$CONF.tmp" <<EOF
# Written by tools/local_slurm_cluster.sh: a 2-node cluster on one machine.
ClusterName=localsim
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs may start again after the credential lifetime (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/ctld.pid
SlurmctldLogFile=$STATE/log/ctld.log
SlurmdPidFile=$STATE/d-%n.pid
SlurmdSpoolDir=$STATE/spool-%n
SlurmdLogFile=$STATE/log/d-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

cluster_answers() { SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q 'is UP'; }

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (munged as user munge, slurmd as root)"
  install_packages
  mkdir -p "$STATE"
  touch "$PIDS"
  start_munge
  export SLURM_CONF="$CONF"
  if ! recorded_pid slurmctld >/dev/null; then
    write_conf  # afresh: this machine's hostname, this script's settings
    rm -f "$STATE/ctld.pid"
    slurmctld -f "$CONF"
    local pid
    pid="$(wait_pidfile "$STATE/ctld.pid" 30)" || die "slurmctld did not start; see $STATE/log/ctld.log"
    record slurmctld "$pid"
  fi
  [ -f "$CONF" ] || write_conf
  for n in n1 n2; do
    if ! recorded_pid "slurmd-$n" >/dev/null; then
      mkdir -p "$STATE/spool-$n"
      rm -f "$STATE/d-$n.pid"
      slurmd -f "$CONF" -N "$n"
      local pid
      pid="$(wait_pidfile "$STATE/d-$n.pid" 30)" || die "slurmd -N $n did not start; see $STATE/log/d-$n.log"
      record "slurmd-$n" "$pid"
    fi
  done
  # wait until both nodes are usable
  local state=""
  for _ in $(seq 120); do
    if cluster_answers; then
      state="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')"
      if echo "$state" | grep -q 'n1 idle' && echo "$state" | grep -q 'n2 idle'; then
        break
      fi
      # nodes left down/drained by an earlier run: resume them
      if echo "$state" | grep -Eq 'down|drain'; then
        scontrol update nodename=n1,n2 state=resume 2>/dev/null || true
      fi
    fi
    state="${state:-no answer}"
    sleep 0.5
  done
  echo "$state" | grep -q 'n1 idle' && echo "$state" | grep -q 'n2 idle' \
    || die "nodes not idle after 60 s ($state); logs in $STATE/log"
  log "cluster up: state and logs in $STATE (logs: $STATE/log)"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  [ -f "$PIDS" ] || { log "nothing recorded in $PIDS: nothing to stop"; return 0; }
  local name pid
  # slurmds and slurmctld first, munged last
  for name in slurmd-n1 slurmd-n2 slurmctld munged; do
    pid="$(recorded_pid "$name" || true)"
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -9 "$pid" 2>/dev/null || true
      log "stopped $name (pid $pid)"
    fi
  done
  rm -f "$PIDS"
  log "stopped; state and logs kept in $STATE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop   (state dir: \$LOCAL_SLURM_DIR, default /tmp/megatron_simreg_slurm)" >&2; exit 2 ;;
esac
