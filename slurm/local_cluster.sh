#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying dist-dpc's cluster path:
# munged (private socket), MariaDB + slurmdbd (accounting: submitit polls sacct), slurmctld and
# N slurmd daemons emulating N nodes (node1..nodeN, one port each, all on 127.0.0.1).
#
#   slurm/local_cluster.sh start    # idempotent; prints the line to eval: export SLURM_CONF=...
#   slurm/local_cluster.sh status   # daemons + sinfo + squeue; exit 0 up, 1 partly up, 3 not running
#   slurm/local_cluster.sh stop     # stops only the daemons this script started (pid files + names);
#                                   # state (job ids, accounting DB, munge key) is kept for the next start
#
# Environment (all optional):
#   DPC_SLURM_DIR     everything lives here            (default ${TMPDIR:-/tmp}/dpc-slurm)
#   SLURM_NODES       emulated nodes node1..nodeN      (default 2)
#   SLURM_CPUS        CPUs advertised per node         (default nproc)
#   SLURM_MEM_MB      RealMemory advertised per node   (default 80% of MemTotal / SLURM_NODES)
#   SLURM_PORT_BASE   slurmctld port; slurmdbd = +2, slurmd = +13, +14, ...   (default 6817)
#   SLURM_MYSQL_PORT  MariaDB TCP port                 (default 3307)
#   SLURM_INSTALL     1 = apt-get install missing Debian packages (default 1)
#   DPC_SLURM_WIPE    1 = `stop` also deletes DPC_SLURM_DIR (job ids restart at 1 afterwards)
#
# Needs root (SlurmUser=root, slurmd) and no systemd: every daemon is started here, self-daemonizes
# and writes its pid file under $DPC_SLURM_DIR/run. Logs: $DPC_SLURM_DIR/log.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

BASE=${DPC_SLURM_DIR:-${TMPDIR:-/tmp}/dpc-slurm}
BASE=${BASE%/}
NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # GNU nproc obeys OMP_NUM_THREADS
INSTALL=${SLURM_INSTALL:-1}
PB=${SLURM_PORT_BASE:-6817}
CTLD_PORT=$PB
DBD_PORT=$((PB + 2))
SLURMD_PORT0=$((PB + 13))
MYSQL_PORT=${SLURM_MYSQL_PORT:-3307}
HOST=$(hostname -s)
CLUSTER=dpc
MUNGE_SOCK=$BASE/munge/munge.socket
MYSOCK=$BASE/mysql/mysqld.sock
export SLURM_CONF=$BASE/etc/slurm.conf

log() { printf '[local_cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODES must be a positive integer, got '$NODES'"
NODE_NAMES=()
for i in $(seq 1 "$NODES"); do NODE_NAMES+=("node$i"); done
NODE_LIST=$(IFS=,; echo "${NODE_NAMES[*]}")

# ---------------------------------------------------------------- process helpers
alive() {  # alive PIDFILE NAME: the pid file names a live process called NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

wait_for() {  # wait_for SECONDS CMD...: retry every 0.1 s
  local n=$(($1 * 10)); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

need_port() {  # need_port PORT WHAT: fail early and clearly instead of a daemon dying in its log
  if port_busy "$1"; then
    die "port $1 for $2 is already in use (another cluster? set SLURM_PORT_BASE / SLURM_MYSQL_PORT): $(ss -ltnpH "sport = :$1" 2>/dev/null | head -1)"
  fi
}

# Daemons started by this script from $BASE whose pid file is gone (state dir wiped or pid file
# deleted while they ran): recognised by their name AND by $BASE/ in their command line (slurmdbd
# has no arguments: by SLURM_CONF in its environment). Prints "pid name" lines.
strays() {
  local p pid comm
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    read -r comm 2>/dev/null <"$p/comm" || continue
    case $comm in
      munged|mariadbd|slurmctld|slurmd)
        { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$BASE/" || continue ;;
      slurmdbd)
        { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF -- "SLURM_CONF=$SLURM_CONF" || continue ;;
      *) continue ;;
    esac
    grep -qx "$pid" "$BASE"/run/*.pid 2>/dev/null && continue   # tracked: not a stray
    echo "$pid $comm"
  done
}

kill_pid() {  # kill_pid PID NAME: TERM, KILL after 10 s; only if PID still is NAME
  local pid=$1 name=$2
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
  log "$name ($pid) ignored TERM, sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 20); do [ -d "/proc/$pid" ] || return 0; sleep 0.1; done
}

stop_pidfile() {  # stop_pidfile FILE NAME
  local pid
  [ -e "$1" ] || return 0
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    kill_pid "$pid" "$2"
    log "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

kill_strays() {  # kill_strays [NAME]: stop untracked daemons of this $BASE (all names by default)
  local pid comm
  while read -r pid comm; do
    [ -n "$pid" ] || continue
    [ -z "${1:-}" ] || [ "$comm" = "$1" ] || continue
    log "stopping $comm (pid $pid) left from an earlier start of $BASE (its pid file is gone)"
    kill_pid "$pid" "$comm"
  done < <(strays)
}

# ---------------------------------------------------------------- packages
install_packages() {
  local need=() c
  command -v munged >/dev/null && command -v mungekey >/dev/null || need+=(munge)
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null || need+=(mariadb-server)
  command -v mariadb >/dev/null || need+=(mariadb-client)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing Debian packages: ${need[*]} (SLURM_INSTALL=1, the default, lets this script apt-get install them)"
  command -v apt-get >/dev/null || die "missing packages ${need[*]} and no apt-get (Debian/Ubuntu only)"
  local alog=$BASE/log/apt.log
  log "installing ${need[*]} with apt-get (log: $alog)"
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts try to start the daemons and are denied without systemd ("policy-rc.d denied
  # execution of start"): harmless, this script starts them itself.
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } >"$alog" 2>&1; then
    tail -n 25 "$alog" >&2
    die "apt-get failed (full log: $alog)"
  fi
  for c in munged mungekey slurmctld slurmd sbatch slurmdbd mariadbd mariadb-install-db mariadb; do
    command -v "$c" >/dev/null || die "$c still missing after apt-get install (see $alog)"
  done
}

# ---------------------------------------------------------------- configuration
CHANGED=()
put() {  # put FILE MODE < content: rewrite only if different (idempotent restarts keep mtimes)
  local tmp; tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  chmod "$2" "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; CHANGED+=("$(basename "$1")"); log "wrote $1"; fi
}

slurm_conf() {
  local mem=${SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 80 / 100 / NODES ))}
  cat <<EOF
# generated by slurm/local_cluster.sh: edits are overwritten on the next start
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroup plugins: constraining memory would move processes out of a container's cgroup
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start batch jobs at once instead of batching submissions for up to 3 s (the default)
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
PlugStackConfig=$BASE/etc/plugstack.conf
ReturnToService=2
InactiveLimit=0
KillWait=5
# finished/cancelled jobs stay in squeue/scontrol for 5 min; sacct (what submitit polls) keeps
# them for good in slurmdbd, so a cancelled job is reported CANCELLED instead of hanging
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
JobRequeue=1
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for the slurmdbd connection this (not AuthInfo) names the munge socket
AccountingStoragePass=$MUNGE_SOCK
EOF
  local i=0 n
  for n in "${NODE_NAMES[@]}"; do
    echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    i=$((i + 1))
  done
  echo "PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

slurmdbd_conf() {
  cat <<EOF
# generated by slurm/local_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
}

write_configs() {
  put "$BASE/etc/slurm.conf" 644 < <(slurm_conf)   # not a pipe: put must run in this shell
  put "$BASE/etc/plugstack.conf" 644 </dev/null
  put "$BASE/etc/slurmdbd.conf" 600 < <(slurmdbd_conf)
}

changed() { local f; for f in "${CHANGED[@]}"; do [ "$f" = "$1" ] && return 0; done; return 1; }

# ---------------------------------------------------------------- daemons
start_munge() {
  if alive "$BASE/run/munged.pid" munged; then log "munged already running"; return; fi
  [ -s "$BASE/munge/munge.key" ] || { mungekey -c -k "$BASE/munge/munge.key"; chmod 400 "$BASE/munge/munge.key"; }
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --key-file="$BASE/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$BASE/run/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed" --num-threads=4 \
    || die "munged failed to start ($BASE/log/munged.log)"
  wait_for 10 bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" || die "munged not answering ($BASE/log/munged.log)"
  log "munged started (pid $(cat "$BASE/run/munged.pid"))"
}

my() { mariadb --no-defaults -S "$MYSOCK" -u root "$@"; }

start_mariadb() {
  if alive "$BASE/run/mysqld.pid" mariadbd; then log "mariadbd already running"
  else
      need_port "$MYSQL_PORT" MariaDB
    if [ ! -d "$BASE/mysql/data/mysql" ]; then
      rm -rf "$BASE/mysql/data"
      mariadb-install-db --no-defaults --datadir="$BASE/mysql/data" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mysql-install.log" 2>&1 \
        || { tail -n 20 "$BASE/log/mysql-install.log" >&2; die "mariadb-install-db failed ($BASE/log/mysql-install.log)"; }
    fi
    setsid mariadbd --no-defaults --user=root --datadir="$BASE/mysql/data" --socket="$MYSOCK" \
      --pid-file="$BASE/run/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$BASE/log/mysqld.err" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 my -e 'select 1' || { tail -n 20 "$BASE/log/mysqld.err" >&2; die "mariadbd not answering ($BASE/log/mysqld.err)"; }
    wait_for 10 alive "$BASE/run/mysqld.pid" mariadbd || die "mariadbd wrote no pid file"
    log "mariadbd started (pid $(cat "$BASE/run/mysqld.pid"))"
  fi
  my -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  if alive "$BASE/run/slurmdbd.pid" slurmdbd; then
    if ! changed slurmdbd.conf; then log "slurmdbd already running"; return; fi
    log "slurmdbd.conf changed: restarting slurmdbd"
    stop_pidfile "$BASE/run/slurmdbd.pid" slurmdbd
  fi
  need_port "$DBD_PORT" slurmdbd
  slurmdbd || die "slurmdbd failed to start ($BASE/log/slurmdbd.log)"   # reads $(dirname $SLURM_CONF)/slurmdbd.conf
  wait_for 60 sacctmgr -n -P show cluster format=cluster || { tail -n 20 "$BASE/log/slurmdbd.log" >&2; die "slurmdbd not answering ($BASE/log/slurmdbd.log)"; }
  log "slurmdbd started (pid $(cat "$BASE/run/slurmdbd.pid"))"
}

register_cluster() {
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "registered cluster $CLUSTER in slurmdbd"
  fi
}

start_slurmctld() {
  local pf
  if changed slurm.conf; then
    # Node or port changes need a restart in 22.05 (reconfigure does not add/remove nodes);
    # jobs survive it (StateSaveLocation). Nothing to do on a first start.
    for pf in "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"; do
      if alive "$pf" slurmd || alive "$pf" slurmctld; then log "slurm.conf changed: restarting slurmctld and slurmd"; break; fi
    done
    for pf in "$BASE"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf" slurmd; done
    stop_pidfile "$BASE/run/slurmctld.pid" slurmctld
  elif alive "$BASE/run/slurmctld.pid" slurmctld; then
    log "slurmctld already running"; return
  fi
  need_port "$CTLD_PORT" slurmctld
  slurmctld -f "$SLURM_CONF" || die "slurmctld failed to start ($BASE/log/slurmctld.log)"
  wait_for 30 bash -c 'scontrol ping | grep -q UP' || { tail -n 20 "$BASE/log/slurmctld.log" >&2; die "slurmctld not answering ($BASE/log/slurmctld.log)"; }
  log "slurmctld started (pid $(cat "$BASE/run/slurmctld.pid"))"
}

start_slurmds() {
  local pf n i=0 keep
  # slurmd of nodes no longer configured (SLURM_NODES lowered)
  for pf in "$BASE"/run/slurmd-*.pid; do
    [ -e "$pf" ] || continue
    n=${pf##*/slurmd-}; n=${n%.pid}; keep=0
    for i in "${NODE_NAMES[@]}"; do [ "$i" = "$n" ] && keep=1; done
    [ "$keep" = 1 ] || stop_pidfile "$pf" slurmd
  done
  i=0
  for n in "${NODE_NAMES[@]}"; do
    if alive "$BASE/run/slurmd-$n.pid" slurmd; then i=$((i + 1)); continue; fi
    need_port "$((SLURMD_PORT0 + i))" "slurmd $n"
    mkdir -p "$BASE/spool/slurmd-$n"
    slurmd -f "$SLURM_CONF" -N "$n" || die "slurmd $n failed to start ($BASE/log/slurmd-$n.log)"
    wait_for 10 alive "$BASE/run/slurmd-$n.pid" slurmd || die "slurmd $n did not start ($BASE/log/slurmd-$n.log)"
    log "slurmd $n started (pid $(cat "$BASE/run/slurmd-$n.pid"))"
    i=$((i + 1))
  done
  nodes_up() { [ "$(sinfo -h -N -p debug -t idle,mix,alloc,completing -o %N | sort -u | wc -l)" -eq "$NODES" ]; }
  if ! wait_for 30 nodes_up; then
    # nodes left DOWN/DRAIN by an earlier run (e.g. killed slurmd): resume them once
    scontrol update nodename="$NODE_LIST" state=resume >/dev/null 2>&1 || true
    wait_for 30 nodes_up || { sinfo -N >&2; die "nodes not idle ($BASE/log/slurmd-*.log)"; }
  fi
}

preflight_ports() {  # every port a daemon still to be started needs must be free: fail before starting any
  local i=0 n
  alive "$BASE/run/mysqld.pid" mariadbd || need_port "$MYSQL_PORT" MariaDB
  alive "$BASE/run/slurmdbd.pid" slurmdbd || need_port "$DBD_PORT" slurmdbd
  alive "$BASE/run/slurmctld.pid" slurmctld || need_port "$CTLD_PORT" slurmctld
  for n in "${NODE_NAMES[@]}"; do
    alive "$BASE/run/slurmd-$n.pid" slurmd || need_port "$((SLURMD_PORT0 + i))" "slurmd $n"
    i=$((i + 1))
  done
}

# ---------------------------------------------------------------- commands
daemon_table() {  # prints "name state" lines; returns the number of live daemons in $UP, total in $ALL
  local pf name n
  UP=0; ALL=0
  for pf in munged:munged.pid mariadbd:mysqld.pid slurmdbd:slurmdbd.pid slurmctld:slurmctld.pid; do
    name=${pf%%:*}; ALL=$((ALL + 1))
    if alive "$BASE/run/${pf#*:}" "$name"; then UP=$((UP + 1)); echo "  $name: running (pid $(cat "$BASE/run/${pf#*:}"))"
    else echo "  $name: stopped"; fi
  done
  for n in "${NODE_NAMES[@]}"; do
    ALL=$((ALL + 1))
    if alive "$BASE/run/slurmd-$n.pid" slurmd; then UP=$((UP + 1)); echo "  slurmd $n: running (pid $(cat "$BASE/run/slurmd-$n.pid"))"
    else echo "  slurmd $n: stopped"; fi
  done
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (the daemons run as SlurmUser=root)"
  mkdir -p "$BASE"/{etc,state,spool,log,run,munge,mysql}
  chmod 755 "$BASE" "$BASE/munge"
  local n
  for n in slurmd slurmctld slurmdbd mariadbd munged; do kill_strays "$n"; done
  install_packages
  preflight_ports
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  register_cluster
  start_slurmctld
  start_slurmds
  # after a restart slurmctld first replays queued accounting records: wait so that sacct (what
  # submitit polls) is current when this returns
  wait_for 20 bash -c "sdiag | grep -q 'DBD Agent queue size: 0\$'" || log "warning: accounting records still queued (sdiag)"
  sinfo >&2
  log "ready: $NODES node(s) ($NODE_LIST) in partition debug, state in $BASE"
  echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
  local pf running n
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    running=$(squeue -h -t running,completing -o %i 2>/dev/null | wc -l || true)
    [ "${running:-0}" -eq 0 ] || log "warning: $running job(s) still running; their steps go on until they end"
  fi
  # Each daemon takes 1-5 s to exit: stop them in parallel where the order does not matter
  # (slurmctld flushes its last accounting records to slurmdbd, which needs MariaDB).
  for pf in "$BASE"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf" slurmd & done
  stop_pidfile "$BASE/run/slurmctld.pid" slurmctld &
  wait
  stop_pidfile "$BASE/run/slurmdbd.pid" slurmdbd
  stop_pidfile "$BASE/run/mysqld.pid" mariadbd &
  stop_pidfile "$BASE/run/munged.pid" munged &
  wait
  for n in slurmd slurmctld slurmdbd mariadbd munged; do kill_strays "$n"; done
  if [ "${DPC_SLURM_WIPE:-0}" = 1 ]; then rm -rf "$BASE"; log "wiped $BASE"; fi
  [ "${DPC_SLURM_WIPE:-0}" = 1 ] || log "stopped (state kept in $BASE)"
}

cmd_status() {
  local table
  table=$(daemon_table)
  daemon_table >/dev/null   # sets UP/ALL in this shell
  if [ "$UP" -eq 0 ]; then
    local lost; lost=$(strays)
    if [ -n "$lost" ]; then
      echo "partly running: daemons of $BASE without pid files (state dir wiped?): ${lost//$'\n'/, }"
      echo "run '$0 start' to replace them or '$0 stop' to end them"
      exit 1
    fi
    echo "not running (state dir $BASE)"
    exit 3
  fi
  echo "local SLURM cluster in $BASE ($UP/$ALL daemons up), SLURM_CONF=$SLURM_CONF"
  echo "$table"
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    sinfo -N -l || true
    squeue || true
  fi
  [ "$UP" -eq "$ALL" ] || { echo "partly running: run '$0 start' to repair or '$0 stop'"; exit 1; }
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (see the header of this script for the environment knobs)" >&2; exit 2 ;;
esac
