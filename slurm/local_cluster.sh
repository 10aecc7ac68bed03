#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying dist-dpc's cluster path:
# munged (private socket), MariaDB + slurmdbd (accounting: submitit polls sacct), slurmctld and
# N slurmd daemons emulating N nodes (node1..nodeN, one port each, all on 127.0.0.1).
#
#   slurm/local_cluster.sh start    # idempotent; prints the SLURM_CONF line to export
#   slurm/local_cluster.sh status   # sinfo + squeue, exit 3 when not running
#   slurm/local_cluster.sh stop     # stops only the daemons this script started (pid files + names)
#
# Environment: DPC_SLURM_DIR (state, default ${TMPDIR:-/tmp}/dpc-slurm), SLURM_NODES (2),
# SLURM_CPUS (per node, default nproc), SLURM_PORT_BASE (6817), SLURM_MYSQL_PORT (3307),
# SLURM_INSTALL=1 (apt-get install missing Debian packages), DPC_SLURM_WIPE=1 (stop also deletes state).
# Debian 12's SLURM 22.05 runs as root without systemd; see docs/cluster.md.
set -euo pipefail

BASE=${DPC_SLURM_DIR:-${TMPDIR:-/tmp}/dpc-slurm}
NODES=${SLURM_NODES:-2}
CPUS=${SLURM_CPUS:-$(nproc)}
INSTALL=${SLURM_INSTALL:-1}
PB=${SLURM_PORT_BASE:-6817}
CTLD_PORT=$PB; DBD_PORT=$((PB + 2)); SLURMD_PORT0=$((PB + 13)); MYSQL_PORT=${SLURM_MYSQL_PORT:-3307}
HOST=$(hostname -s)
CLUSTER=dpc
MUNGE_SOCK=$BASE/munge/munge.socket
export SLURM_CONF=$BASE/etc/slurm.conf

log() { printf '[local_cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() {  # alive PIDFILE NAME: the pid file names a live process called NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

wait_for() {  # wait_for SECONDS CMD...: retry every 0.1 s
  local n=$(($1 * 10)); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

node_names() { for i in $(seq 1 "$NODES"); do echo "node$i"; done; }

install_packages() {
  local need=()
  command -v munged >/dev/null || need+=(munge)
  command -v slurmctld >/dev/null || need+=(slurmctld)
  command -v slurmd >/dev/null || need+=(slurmd)
  command -v sbatch >/dev/null || need+=(slurm-client)
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v mariadbd >/dev/null || need+=(mariadb-server)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing packages: ${need[*]} (set SLURM_INSTALL=1 to apt-get install them)"
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # Package scripts try to start the daemons and are denied without systemd: harmless.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1
}

CHANGED=0
put() {  # put FILE < content: rewrite only if different (idempotent restarts keep mtimes)
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; chmod 644 "$1"; CHANGED=1; fi
}

write_configs() {
  local mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 80 / 100 / NODES ))
  local list; list=$(node_names | paste -sd,)
  {
    cat <<EOF
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
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
PlugStackConfig=$BASE/etc/plugstack.conf
ReturnToService=2
InactiveLimit=0
KillWait=5
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
AccountingStoragePass=$MUNGE_SOCK
EOF
    local i=0
    for n in $(node_names); do
      echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
      i=$((i + 1))
    done
    echo "PartitionName=debug Nodes=$list Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } | put "$BASE/etc/slurm.conf"
  put "$BASE/etc/plugstack.conf" </dev/null
  put "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
}

start_munge() {
  if alive "$BASE/run/munged.pid" munged; then return; fi
  [ -s "$BASE/munge/munge.key" ] || { mungekey -c -k "$BASE/munge/munge.key"; chmod 400 "$BASE/munge/munge.key"; }
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --key-file="$BASE/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$BASE/run/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed" --num-threads=4
  wait_for 10 bash -c "munge -S '$MUNGE_SOCK' -n | unmunge -S '$MUNGE_SOCK'" || die "munged not answering ($BASE/log/munged.log)"
  log "munged started"
}

start_accounting() {
  local sock=$BASE/mysql/mysqld.sock
  my() { mariadb --no-defaults -S "$sock" -u root "$@"; }
  if ! alive "$BASE/run/mysqld.pid" mariadbd; then
    if [ ! -d "$BASE/mysql/data/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$BASE/mysql/data" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mysql-install.log" 2>&1 \
        || die "mariadb-install-db failed ($BASE/log/mysql-install.log)"
    fi
    setsid mariadbd --no-defaults --user=root --datadir="$BASE/mysql/data" --socket="$sock" \
      --pid-file="$BASE/run/mysqld.pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
      --log-error="$BASE/log/mysqld.err" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
    wait_for 60 my -e 'select 1' || die "mariadbd not answering ($BASE/log/mysqld.err)"
    log "mariadbd started"
  fi
  my -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  if ! alive "$BASE/run/slurmdbd.pid" slurmdbd; then
    slurmdbd
    wait_for 60 sacctmgr -n -P show cluster format=cluster || die "slurmdbd not answering ($BASE/log/slurmdbd.log)"
    log "slurmdbd started"
  fi
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

start_slurm() {
  if alive "$BASE/run/slurmctld.pid" slurmctld; then
    [ "$CHANGED" = 1 ] && scontrol reconfigure
  else
    slurmctld -f "$SLURM_CONF"
    wait_for 30 bash -c 'scontrol ping | grep -q UP' || die "slurmctld not answering ($BASE/log/slurmctld.log)"
    log "slurmctld started"
  fi
  for n in $(node_names); do
    alive "$BASE/run/slurmd-$n.pid" slurmd && continue
    mkdir -p "$BASE/spool/slurmd-$n"
    slurmd -f "$SLURM_CONF" -N "$n"
    wait_for 10 alive "$BASE/run/slurmd-$n.pid" slurmd || die "slurmd $n did not start ($BASE/log/slurmd-$n.log)"
  done
  idle() { [ "$(sinfo -h -N -p debug -t idle,mix,alloc -o %N | sort -u | wc -l)" -eq "$NODES" ]; }
  if ! wait_for 30 idle; then
    scontrol update nodename="$(node_names | paste -sd,)" state=resume >/dev/null 2>&1 || true
    wait_for 30 idle || { sinfo -N >&2; die "nodes not idle ($BASE/log/slurmd-*.log)"; }
  fi
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, then KILL after 10 s; never touches a recycled pid
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  if alive "$1" "$2"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    log "stopped $2 ($pid)"
  fi
  rm -f "$1"
}

case "${1:-}" in
  start)
    install_packages
    mkdir -p "$BASE"/{etc,state,spool,log,run,munge,mysql}
    chmod 755 "$BASE" "$BASE/munge"
    write_configs
    start_munge
    start_accounting
    start_slurm
    log "ready: $NODES nodes ($(node_names | paste -sd' '))"
    echo "export SLURM_CONF=$SLURM_CONF"
    ;;
  stop)
    shopt -s nullglob
    for pf in "$BASE"/run/slurmd-*.pid; do stop_pidfile "$pf" slurmd; done
    stop_pidfile "$BASE/run/slurmctld.pid" slurmctld
    stop_pidfile "$BASE/run/slurmdbd.pid" slurmdbd
    stop_pidfile "$BASE/run/mysqld.pid" mariadbd
    stop_pidfile "$BASE/run/munged.pid" munged
    if [ "${DPC_SLURM_WIPE:-0}" = 1 ]; then rm -rf "$BASE"; log "wiped $BASE"; fi
    ;;
  status)
    if alive "$BASE/run/slurmctld.pid" slurmctld; then
      sinfo -N
      squeue
    else
      echo "not running (state in $BASE)"
      exit 3
    fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
