#!/usr/bin/env bash
# Start a single-node SLURM cluster on loopback from Debian's packages, for the SLURM tests.
#
#   sudo bash tests/slurm/start_cluster.sh     # idempotent: reuses whatever is already up
#   sudo bash tests/slurm/stop_cluster.sh      # stops what this script started
#
# Daemons (all as root except munged and mariadbd): munged (default socket; an already
#   working munged is reused), a private mariadbd (127.0.0.1:33061, data under $STATE),
#   slurmdbd (6819), slurmctld (6817), slurmd (127.0.0.1:6818). Every address in the configs
#   is 127.0.0.1, so all traffic stays on loopback; slurmctld and slurmdbd have no bind
#   option, so their ports listen on all addresses (munge-authenticated).
# Config: /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf (job steps drop SLURM_CONF,
# so the config has to be at the default path). The script refuses to overwrite a
# slurm.conf it did not write. State and logs: $STATE (default /var/lib/bon-slurm-test).
#
# Packages: .ci/install-slurm.sh (slurmctld slurmd slurm-client munge slurmdbd mariadb-server).
# On failure it prints one line "start_cluster: FAILED at step '<step>': <reason>" (stderr
# and stdout) followed by the tail of the relevant log, and exits non-zero.
# On success the last line is "start_cluster: OK partition=debug account=bontest node=<node>".
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${BON_SLURM_STATE:-/var/lib/bon-slurm-test}"
CONF_DIR=/etc/slurm
MARKER="written by tests/slurm/start_cluster.sh"
DBPORT=33061
DBSOCK="$STATE/mysql/mysqld.sock"
ACCOUNT=bontest
CLUSTER=bontest
PARTITION=debug
STEP="init"
LOGHINT=""

say() { echo "start_cluster: $*"; }
fail() {
  local msg="start_cluster: FAILED at step '$STEP': $*"
  echo "$msg"
  echo "$msg" >&2
  if [ -n "$LOGHINT" ] && [ -f "$LOGHINT" ]; then
    echo "--- last lines of $LOGHINT:" >&2
    tail -n 20 "$LOGHINT" >&2
  fi
  exit 1
}
step() { STEP="$1"; LOGHINT="${2:-}"; say "$STEP"; }
# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.5 s until it succeeds (bounded).
wait_for() {
  local secs="$1" what="$2"; shift 2
  local tries=$((secs * 2))
  for ((i = 0; i < tries; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "timed out after ${secs}s waiting for $what"
}
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }
# render TEMPLATE DEST MODE: fill the @VAR@ placeholders; never replace a foreign file.
render() {
  local tmpl="$1" dest="$2" mode="$3" tmp
  if [ -f "$dest" ] && ! grep -q "$MARKER" "$dest"; then
    fail "$dest exists and was not written by this script (a real SLURM install?); refusing to overwrite it"
  fi
  tmp="$(mktemp)"
  sed -e "s|@NODE@|$NODE|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" \
      -e "s|@MEM@|$MEM|g" -e "s|@DBPORT@|$DBPORT|g" -e "s|@DBPASS@|$DBPASS|g" \
      "$tmpl" >"$tmp" || fail "cannot render $tmpl"
  if ! cmp -s "$tmp" "$dest"; then
    install -m "$mode" "$tmp" "$dest" || fail "cannot write $dest"
    CONFIG_CHANGED=1
  fi
  rm -f "$tmp"
}

# ---------------------------------------------------------------------------------------
step "check root"
[ "$(id -u)" -eq 0 ] || fail "must run as root (daemons run as root; config goes to /etc/slurm)"

step "check packages"
missing=()
for bin in munged munge unmunge slurmctld slurmd sbatch srun squeue sinfo scontrol sacct \
           sacctmgr slurmdbd mariadbd mariadb-install-db mariadb mariadb-admin; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
[ ${#missing[@]} -eq 0 ] || fail "missing programs: ${missing[*]} (install them with: bash .ci/install-slurm.sh)"
export PATH="$PATH:/usr/sbin:/sbin"

NODE="$(hostname -s)"
CPUS="$(nproc)"; [ "$CPUS" -ge 2 ] || CPUS=2
# Advertise plenty of memory (SlurmdParameters=config_overrides) so any mem_mb is accepted;
# a job is still killed when it uses more than it asked for (OverMemoryKill).
MEM=262144
step "prepare state directory $STATE"
mkdir -p "$STATE"/{run,log,slurmctld,slurmd} "$CONF_DIR" || fail "cannot create $STATE"
# mariadbd (user mysql) must reach $STATE/mysql; everything else in $STATE is root's.
chmod 711 "$STATE" || fail "cannot chmod $STATE"
if [ ! -s "$STATE/dbpass" ]; then
  (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$STATE/dbpass") \
    || fail "cannot write $STATE/dbpass"
fi
DBPASS="$(cat "$STATE/dbpass")"

step "check hostname resolves"
getent hosts "$NODE" >/dev/null 2>&1 || fail "hostname '$NODE' does not resolve (add '127.0.0.1 $NODE' to /etc/hosts)"

step "write /etc/slurm config"
CONFIG_CHANGED=0
render "$HERE/slurm.conf.in" "$CONF_DIR/slurm.conf" 644
render "$HERE/slurmdbd.conf.in" "$CONF_DIR/slurmdbd.conf" 600

# ---------------------------------------------------------------------------------------
step "start munged" /var/log/munge/munged.log
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running (reused)"
else
  getent passwd munge >/dev/null || fail "no 'munge' user (is the munge package installed?)"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || fail "mungekey --create failed"
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || fail "cannot create munge key"
    fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  touch "$STATE/run/munged.ours"
  wait_for 20 "munge credentials (munge -n | unmunge)" sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------------------------------
step "start mariadb (accounting storage)" "$STATE/log/mariadb.err"
mysql_ping() { mariadb-admin --no-defaults -S "$DBSOCK" -uroot ping; }
if mysql_ping >/dev/null 2>&1; then
  say "mariadb already running (reused)"
else
  mkdir -p "$STATE/mysql"
  if [ ! -d "$STATE/mysql/data/mysql" ]; then
    mkdir -p "$STATE/mysql/data"
    chown -R mysql:mysql "$STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db \
      >"$STATE/log/mariadb-install.log" 2>&1 \
      || { LOGHINT="$STATE/log/mariadb-install.log"; fail "mariadb-install-db failed"; }
  fi
  chown -R mysql:mysql "$STATE/mysql"
  touch "$STATE/log/mariadb.err" && chown mysql:mysql "$STATE/log/mariadb.err"
  setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
    --socket="$DBSOCK" --pid-file="$STATE/mysql/mariadbd.pid" \
    --port="$DBPORT" --bind-address=127.0.0.1 --log-error="$STATE/log/mariadb.err" \
    --innodb-buffer-pool-size=64M --skip-name-resolve </dev/null >/dev/null 2>&1 &
  wait_for 60 "mariadbd to answer on $DBSOCK" mysql_ping
fi
mariadb --no-defaults -S "$DBSOCK" -uroot <<SQL || fail "cannot create the accounting database and user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# ---------------------------------------------------------------------------------------
# A running daemon keeps its old config: restart it when this run changed the config.
restart_if_changed() {
  local pidfile="$1" name="$2"
  if [ "$CONFIG_CHANGED" = 1 ] && pid_alive "$pidfile"; then
    say "config changed: restarting $name"
    kill "$(cat "$pidfile")" 2>/dev/null
    for ((i = 0; i < 40; i++)); do pid_alive "$pidfile" || break; sleep 0.5; done
    pid_alive "$pidfile" && fail "$name (pid $(cat "$pidfile")) did not stop for a restart"
  fi
}

step "start slurmdbd" "$STATE/log/slurmdbd.log"
restart_if_changed "$STATE/run/slurmdbd.pid" slurmdbd
if pid_alive "$STATE/run/slurmdbd.pid"; then
  say "slurmdbd already running (reused)"
else
  slurmdbd || fail "slurmdbd did not start"
fi
wait_for 60 "slurmdbd to answer (sacctmgr list cluster)" sacctmgr -n -P list cluster

step "register cluster, account and user in slurmdbd (before slurmctld starts)" "$STATE/log/slurmdbd.log"
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
  || sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed"
sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" \
  || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=bon-tests organization=bon >/dev/null \
  || fail "sacctmgr add account $ACCOUNT failed"
sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
  || sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
sacctmgr -n -P list user root format=defaultaccount | grep -qx "$ACCOUNT" \
  || sacctmgr -i modify user root set defaultaccount="$ACCOUNT" >/dev/null
sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" \
  || fail "root has no association with account $ACCOUNT (sacctmgr add user root failed)"

step "start slurmctld" "$STATE/log/slurmctld.log"
restart_if_changed "$STATE/run/slurmctld.pid" slurmctld
if pid_alive "$STATE/run/slurmctld.pid"; then
  say "slurmctld already running (reused)"
else
  slurmctld || fail "slurmctld did not start"
fi
wait_for 60 "slurmctld to answer (scontrol ping)" sh -c 'scontrol ping | grep -q UP'

step "start slurmd" "$STATE/log/slurmd.log"
restart_if_changed "$STATE/run/slurmd.pid" slurmd
if pid_alive "$STATE/run/slurmd.pid"; then
  say "slurmd already running (reused)"
else
  slurmd -N "$NODE" || fail "slurmd did not start"
fi
node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated|completing)$'; }
for ((i = 0; i < 60; i++)); do
  node_ready && break
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null)"
  case "$state" in
    down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
  esac
  sleep 0.5
done
node_ready || fail "node $NODE is not usable (sinfo state: '$(sinfo -h -n "$NODE" -o '%T %E' 2>&1)')"

# ---------------------------------------------------------------------------------------
step "smoke test: sbatch --wait a trivial job" "$STATE/log/slurmctld.log"
out="$(timeout 120 sbatch --parsable --wait -p "$PARTITION" -A "$ACCOUNT" -J bon-smoke \
        -o /dev/null -t 1 --wrap true 2>&1)" || fail "trivial batch job did not complete: $out"
jobid="${out%%;*}"
step "smoke test: sacct sees the job" "$STATE/log/slurmdbd.log"
wait_for 60 "sacct to report job $jobid as COMPLETED" \
  sh -c "sacct -n -X -P -j '$jobid' -o State | grep -q COMPLETED"

say "OK partition=$PARTITION account=$ACCOUNT node=$NODE state=$STATE"
