#!/usr/bin/env bash
# A real one-node SLURM cluster on loopback, built from Debian's slurm-wlm and munge, for
# proving the workflow under `snakemake --executor slurm` (tests/test_cluster.py) on a
# laptop, a container or CI. No systemd, no cgroups, no accounting database; the node
# advertises fake GPUs (gres) so that `resources: gpu=1` is really scheduled.
#
#   scripts/local-slurm.sh install          apt-get slurmctld, slurmd, slurm-client, munge
#   scripts/local-slurm.sh start [--gpus N] start munged (unless one runs), slurmctld, slurmd
#   scripts/local-slurm.sh smoke            sinfo, srun, srun --gpus=1, sbatch --wait
#   scripts/local-slurm.sh status           exit 0 all up, 1 nothing started, 2 a daemon died
#   scripts/local-slurm.sh stop             stop only the daemons `start` started
#
# Run as root. Debian 12 (slurm-wlm 22.05, munge 0.5) with snakemake-executor-plugin-slurm
# 2.8 is what this was checked on. Without an accounting database the plugin must query
# job states with squeue (profiles/slurm: `slurm-status-command: squeue`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/local-slurm"
# Everything this script owns lives under these paths, so `stop` and `start` never touch a
# site's own SLURM installation (its spool, logs or PID files).
STATE=${LOCAL_SLURM_STATE:-/run/local-slurm}
SPOOL=/var/spool/local-slurm
LOGS=/var/log/local-slurm
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK="# written by rvae-tools scripts/local-slurm.sh"
CLUSTER=${LOCAL_SLURM_CLUSTER:-rvaetools}

log() { printf '[local-slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cmd=${1:-}; shift || true
GPUS=2
while [ $# -gt 0 ]; do
  case $1 in
    --gpus) GPUS=$2; shift ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
case $GPUS in ''|*[!0-9]*) die "--gpus needs a number, got '$GPUS'" ;; esac

need_root() { [ "$(id -u)" = 0 ] || die "'$cmd' must run as root (it installs packages / starts daemons)"; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local seconds=$1 what=$2; shift 2
  local i
  for i in $(seq "$((seconds * 4))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  die "timed out after ${seconds}s waiting for $what (logs: $LOGS)"
}

record() {  # record NAME PIDFILE: remember a daemon we started, by PID
  wait_for 20 "$1 to write $2" test -s "$2"
  cp "$2" "$STATE/$1.pid"
  log "$1 started (pid $(cat "$STATE/$1.pid"))"
}

running() {  # running COMM: is any process of that exact name alive?
  local f
  for f in /proc/[0-9]*/comm; do
    [ "$(cat "$f" 2>/dev/null)" = "$1" ] && return 0
  done
  return 1
}

installed() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; }

do_install() {
  need_root
  if installed >/dev/null; then log "already installed"; return 0; fi
  command -v apt-get >/dev/null || die "no apt-get: install slurm (slurmctld, slurmd, client) and munge yourself"
  # The packages' maintainer scripts try to start their services; there may be no init
  # system to do it, and we start the daemons ourselves anyway. policy-rc.d 101 = "don't".
  POLICY=/usr/sbin/policy-rc.d
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"; chmod +x "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  log "installed $(dpkg-query -W -f='${Package} ${Version}  ' slurmctld munge)"
}

render() {  # render TEMPLATE: fill the @PLACEHOLDERS@ from this machine
  local host hw cpus sockets cores threads mem gres
  host=$(hostname -s)
  # Declare exactly the hardware slurmd detects, or it marks the node invalid.
  hw=$(slurmd -C | head -1)
  field() { printf '%s\n' "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  cpus=$(field CPUs); sockets=$(field SocketsPerBoard)
  cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore)
  mem=$(( $(field RealMemory) * 8 / 10 ))
  gres=""; [ "$GPUS" -gt 0 ] && gres="Gres=gpu:fake:$GPUS"
  sed -e "s|@MARK@|$MARK|" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$host|g" \
      -e "s|@CPUS@|$cpus|" -e "s|@SOCKETS@|$sockets|" -e "s|@CORES@|$cores|" \
      -e "s|@THREADS@|$threads|" -e "s|@MEM@|$mem|" -e "s|@GRES@|$gres|" \
      -e "s|@LASTGPU@|$((GPUS - 1))|" -e "s|@SPOOL@|$SPOOL|g" -e "s|@LOGS@|$LOGS|g" \
      -e "s|@STATE@|$STATE|g" "$1"
}

ours_or_absent() {  # a config file we may (over)write: absent, or written by us
  [ ! -e "$1" ] || head -1 "$1" | grep -qF "$MARK"
}

do_start() {
  need_root
  installed >/dev/null || die "slurm is not installed: run '$0 install'"
  if ls "$STATE"/*.pid >/dev/null 2>&1; then die "already started (see '$0 status', '$0 stop')"; fi
  running slurmctld && die "a slurmctld not started by this script is running; not touching it"
  running slurmd && die "a slurmd not started by this script is running; not touching it"
  ours_or_absent "$CONF" || die "$CONF exists and is not ours; not overwriting a site's SLURM config"
  ours_or_absent "$GRES_CONF" || die "$GRES_CONF exists and is not ours; not overwriting it"

  mkdir -p "$STATE"
  install -d -o slurm -g slurm "$STATE/run" "$SPOOL/ctld" "$LOGS"
  # A fresh controller state every start: job ids from 1, no jobs left from an earlier run.
  rm -rf "${SPOOL:?}/ctld/"* "${SPOOL:?}/d"
  install -d "$SPOOL/d"

  # Fake GPUs: character devices 1:3 behave like /dev/null. SLURM only needs the files to
  # count and hand out devices (CUDA_VISIBLE_DEVICES); no real GPU is touched.
  local i
  : > "$STATE/devices"
  for i in $(seq 0 $((GPUS - 1))); do
    if [ ! -e "/dev/fakegpu$i" ]; then
      mknod -m 666 "/dev/fakegpu$i" c 1 3
      echo "/dev/fakegpu$i" >> "$STATE/devices"
    fi
  done

  # Reuse a munged that already answers (a site's own); start one only when none does.
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running; using it"
  else
    if [ ! -s /etc/munge/munge.key ]; then
      mungekey --create --keyfile=/etc/munge/munge.key
      chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    record munged /run/munge/munged.pid
    wait_for 10 "munge to answer" sh -c 'munge -n | unmunge'
  fi

  mkdir -p /etc/slurm
  render "$TEMPLATES/slurm.conf.in" > "$CONF"
  if [ "$GPUS" -gt 0 ]; then render "$TEMPLATES/gres.conf.in" > "$GRES_CONF"; else rm -f "$GRES_CONF"; fi

  /usr/sbin/slurmctld
  record slurmctld "$STATE/run/slurmctld.pid"
  wait_for 30 "slurmctld to answer" sh -c 'scontrol ping | grep -q UP'
  /usr/sbin/slurmd
  record slurmd "$STATE/run/slurmd.pid"
  local host; host=$(hostname -s)
  wait_for 30 "node $host to become idle" sh -c "sinfo -h -n $host -o %T | grep -qx idle"
  log "cluster '$CLUSTER' up: $(sinfo -h -o 'partition=%P nodes=%D state=%T cpus=%c mem=%mMB gres=%G')"
}

do_smoke() {
  sinfo
  srun hostname
  local gpus
  gpus=$(srun --gpus=1 sh -c 'echo "$CUDA_VISIBLE_DEVICES"')
  [ -n "$gpus" ] || die "a job asking for --gpus=1 saw no CUDA_VISIBLE_DEVICES"
  log "job with --gpus=1: CUDA_VISIBLE_DEVICES=$gpus"
  local out; out=$(mktemp)
  sbatch --wait -o "$out" --wrap 'echo "batch job $SLURM_JOB_ID on $(hostname)"' >/dev/null
  cat "$out"; rm -f "$out"
  squeue --states=all -o '%.6i %.20j %.10T %.8M %b'
}

do_status() {  # exit 0: all up; 1: nothing started; 2: started, but a daemon is gone
  local f n p any=0 gone=0
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] || continue
    any=1; n=$(basename "$f" .pid); p=$(cat "$f")
    if [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$n" ]; then log "$n running (pid $p)"
    else log "$n gone (pid $p)"; gone=1; fi
  done
  [ "$any" = 1 ] || { log "nothing started by this script"; return 1; }
  sinfo 2>/dev/null || true
  [ "$gone" = 0 ] || return 2
}

stop_one() {  # stop_one NAME: the recorded PID, only if it is still that program
  local f="$STATE/$1.pid" p i
  [ -e "$f" ] || return 0
  p=$(cat "$f")
  if [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$1" ]; then
    kill "$p"
    for i in $(seq 80); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$p" 2>/dev/null; then log "$1 (pid $p) ignored SIGTERM; SIGKILL"; kill -9 "$p"; fi
    log "stopped $1 (pid $p)"
  else
    log "$1: pid $p is no longer $1; leaving it alone"
  fi
  rm -f "$f"
}

do_stop() {
  need_root
  [ -d "$STATE" ] || { log "nothing started by this script"; return 0; }
  # Jobs still queued or running belong to this cluster; cancel them before slurmd goes.
  if [ -e "$STATE/slurmctld.pid" ]; then scancel --full --quiet --user="$(id -un)" 2>/dev/null || true; fi
  stop_one slurmd
  stop_one slurmctld
  stop_one munged
  if [ -e "$STATE/devices" ]; then xargs -r rm -f < "$STATE/devices"; fi
  # Our configs go too, so a later site install of slurm is not shadowed by them.
  local c
  for c in "$CONF" "$GRES_CONF"; do
    if [ -e "$c" ] && ours_or_absent "$c"; then rm -f "$c"; fi
  done
  rm -rf "$STATE"
}

case $cmd in
  install) do_install ;;
  start) do_start ;;
  smoke) do_smoke ;;
  status) do_status ;;
  stop) do_stop ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
