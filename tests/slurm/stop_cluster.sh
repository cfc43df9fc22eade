#!/usr/bin/env bash
# Stop the test cluster that tests/slurm/start_cluster.sh started (by pid file, nothing else).
#   sudo bash tests/slurm/stop_cluster.sh           # stop daemons, keep state (fast restart)
#   sudo bash tests/slurm/stop_cluster.sh --purge   # also remove state and /etc/slurm configs
#   sudo bash tests/slurm/stop_cluster.sh --remove-config   # keep state, remove the configs
# Removing the configs matters on a machine that keeps SLURM's tools installed: a slurm.conf
# naming a controller that is not running makes `scontrol` wait ~10 s, and the Snakemake SLURM
# executor plugin runs `scontrol show config` when it is imported, i.e. in every `snakemake`.
# munged is stopped only when start_cluster.sh started it.
set -uo pipefail
STATE="${BON_SLURM_STATE:-/var/lib/bon-slurm-test}"
MARKER="written by tests/slurm/start_cluster.sh"

stop_pidfile() {
  local pidfile="$1" name="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile" 2>/dev/null)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "stop_cluster: stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null
    for ((i = 0; i < 40; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop_cluster: $name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null
    fi
  fi
  rm -f "$pidfile"
}

if [ -d "$STATE" ]; then
  # Cancel leftover test jobs first, so that slurmd does not keep orphans around.
  if command -v scancel >/dev/null 2>&1; then
    timeout 10 scancel -A bontest >/dev/null 2>&1 || true
  fi
  stop_pidfile "$STATE/run/slurmd.pid" slurmd
  stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
  stop_pidfile "$STATE/run/slurmdbd.pid" slurmdbd
  stop_pidfile "$STATE/mysql/mariadbd.pid" mariadbd
  if [ -f "$STATE/run/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$STATE/run/munged.ours"
  fi
fi

if [ "${1:-}" = "--purge" ] || [ "${1:-}" = "--remove-config" ]; then
  for f in /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf; do
    if [ -f "$f" ] && grep -q "$MARKER" "$f"; then rm -f "$f"; fi
  done
fi
if [ "${1:-}" = "--purge" ]; then
  case "$STATE" in
    /var/lib/bon-slurm-test|/tmp/*) rm -rf "$STATE" ;;
    *) echo "stop_cluster: not removing custom state dir $STATE" ;;
  esac
fi
echo "stop_cluster: done"
