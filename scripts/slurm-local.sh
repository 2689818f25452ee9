#!/bin/sh
# A real single-node Slurm cluster on this machine, for `visionmix compare --launcher slurm` and its tests:
# Debian's slurm-wlm and munge (installed with apt-get when missing), munged as the munge user, slurmctld, slurmd.
#
#   scripts/slurm-local.sh start    install if needed, write /etc/slurm/slurm.conf, start what is not running,
#                                   wait until `srun true` works (idempotent)
#   scripts/slurm-local.sh stop     cancel every job, stop slurmd, slurmctld and the munged it started (idempotent)
#   scripts/slurm-local.sh status   what runs, and sinfo
#
# Needs root. Exit status 0 on success, 1 on a failure (the reason on one line), 3 when this machine cannot run it
# (not root, no apt-get): `make test` then runs without it and the Slurm tests skip saying why.
set -eu

STATE=${VISIONMIX_SLURM_STATE:-/var/lib/visionmix-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by visionmix scripts/slurm-local.sh"
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm-local: $*"; }
fail() { echo "slurm-local: error: $1" >&2; exit "${2:-1}"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds, at most SECONDS of wall time
  deadline=$(($(date +%s) + $1)); shift
  while ! "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get" 3
  say "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || fail "apt-get update failed"
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || fail "apt-get install slurm-wlm munge failed"
}

start_munge() {
  munge_works && return 0
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --force
  touch "$STATE/munged.ours"  # ours to stop
  wait_for 10 munge_works || fail "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
  [ ! -f "$CONF" ] || head -n 1 "$CONF" | grep -qxF "$MARK" ||
    fail "$CONF exists and was not written by this script; not replacing it"
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... Boards=... RealMemory=...: this node as slurmd sees it
  host=$(hostname -s)
  mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
  chown slurm:slurm "$STATE/ctld" "$STATE/log"
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=visionmix-local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
# a requeued job may start again cred_expire seconds after it ended (Slurm's default: 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look for work every few seconds (defaults: 60 and 30), so a requeued job starts again soon
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
# past its time limit a job gets SIGTERM, and SIGKILL KillWait seconds later
KillWait=30
OverTimeLimit=0
InactiveLimit=0
SlurmdTimeout=120
$node State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then rm "$CONF.new"; return 1; fi
  mv "$CONF.new" "$CONF"  # changed: running daemons must restart
}

cluster_works() { timeout 10 srun --quiet --ntasks=1 --time=1 true; }

start() {
  [ "$(id -u)" = 0 ] || fail "needs root (it installs packages and starts system daemons)" 3
  install_packages
  mkdir -p "$STATE"
  start_munge
  if write_conf && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; }; then
    say "slurm.conf changed: restarting the daemons"
    stop_slurm
  fi
  # with no slurmd running no job can be: a fresh slurmctld starts from a clean state (-c), not from jobs of a cluster
  # that ended without stop (they would hold the node's CPUs for ever)
  if ! alive "$STATE/slurmctld.pid"; then
    if alive "$STATE/slurmd.pid"; then slurmctld; else slurmctld -c; fi
  fi
  wait_for 20 scontrol ping || fail "slurmctld did not answer (see $STATE/log/slurmctld.log)"
  alive "$STATE/slurmd.pid" || slurmd
  scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true  # a node left down by a past stop
  wait_for 30 cluster_works || fail "srun does not run a job (see $STATE/log/slurmd.log, $STATE/log/slurmctld.log)"
  say "running: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM, then SIGKILL after 20 s
  alive "$1" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  wait_for 20 sh -c "! kill -0 $pid" || { kill -9 "$pid" 2>/dev/null || true; wait_for 5 sh -c "! kill -0 $pid"; }
  rm -f "$1"
}

stop_slurm() {
  if alive "$STATE/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      wait_for 40 sh -c '[ -z "$(squeue -h -o %A)" ]' || say "some jobs did not end in 40 s"
    fi
  fi
  stop_pid "$STATE/slurmd.pid"
  stop_pid "$STATE/slurmctld.pid"
  # job steps outlive slurmd: end those of this cluster (their spool directory is ours)
  for pid in $(pgrep -x slurmstepd || true); do
    kill -9 "$pid" 2>/dev/null || true
  done
}

stop() {
  [ "$(id -u)" = 0 ] || fail "needs root" 3
  stop_slurm
  if [ -f "$STATE/munged.ours" ]; then
    stop_pid "$MUNGE_PID"
    rm -f "$STATE/munged.ours"
  fi
  say "stopped"
}

status() {
  for d in slurmctld slurmd; do
    if alive "$STATE/$d.pid"; then say "$d running (pid $(cat "$STATE/$d.pid"))"; else say "$d not running"; fi
  done
  if munge_works; then say "munged running"; else say "munged not running"; fi
  alive "$STATE/slurmctld.pid" && sinfo
  alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
