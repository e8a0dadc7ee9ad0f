#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the launch tests and for trying
# `psm-train submit` / `psm-train sweep` locally (Debian 12, root, no systemd, no cgroups).
#
#   bash tools/slurm_local.sh start    # install if needed, configure, start, wait until the node is idle
#   bash tools/slurm_local.sh stop     # stop the daemons this script started (by pid file, never by name)
#   bash tools/slurm_local.sh status
#
# Env: SLURM_CPUS (default nproc --all: plain nproc honours OMP_NUM_THREADS), SLURM_MEM_MB (default 90% of MemTotal),
#      SLURM_WITH_DBD=1 (default) also runs MariaDB + slurmdbd so that sacct (job states) works.
# Adapted from ../shared/slurm-local.sh (see ../shared/PLATFORM.md for why each setting is there).
set -euo pipefail

STATE=/var/spool/slurm-psm
LOGD=/var/log/slurm-psm
RUND=/run/slurm-psm
CONF=/etc/slurm/slurm.conf
WITH_DBD="${SLURM_WITH_DBD:-1}"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local pkgs="slurm-wlm munge" b need=0
  [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  for b in slurmctld slurmd munged $([ "$WITH_DBD" = 1 ] && echo slurmdbd mariadbd); do have "$b" || need=1; done
  [ $need = 0 ] && return
  # "policy-rc.d denied execution" lines are harmless: there is no init system here.
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
}

start_munge() {
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  munge -n | unmunge | grep -q 'STATUS: *Success' || { echo "munge does not work" >&2; exit 1; }
}

start_dbd() {  # MariaDB + slurmdbd: without them sacct is off and submitit reads every state as UNKNOWN
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 >"$LOGD/mariadb.log" 2>&1 &
    for _ in $(seq 150); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpsm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOGD/slurmdbd.log
PidFile=$RUND/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpsm
StorageLoc=slurm_acct_db
CONF
  chmod 600 /etc/slurm/slurmdbd.conf  # slurmdbd refuses a config others can read
  alive "$RUND/slurmdbd.pid" || /usr/sbin/slurmdbd
}

write_conf() {
  local host="$1" acct="$2"
  local cpus="${SLURM_CPUS:-$(nproc --all)}"
  local mem="${SLURM_MEM_MB:-$(awk '/MemTotal/{printf "%d", $2/1024*0.9}' /proc/meminfo)}"
  cat > "$CONF" <<CONF
ClusterName=psm
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also bounds how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
# no cgroups in this container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$acct
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUND/slurmctld.pid
SlurmdPidFile=$RUND/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SchedulerType=sched/backfill
# short scheduler passes so that a requeued job starts again within seconds
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
KillWait=5
MinJobAge=300
InactiveLimit=0
JobRequeue=1
DefMemPerCPU=$(( mem / cpus / 4 ))
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start() {
  local t0=$SECONDS host acct="AccountingStorageType=accounting_storage/none"
  if alive "$RUND/slurmctld.pid" && sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    echo "slurm already running"; return
  fi
  install_packages
  host="$(hostname -s)"
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts  # slurmd looks itself up by name
  mkdir -p "$STATE/ctld" "$STATE/d" "$LOGD" "$RUND" /etc/slurm
  start_munge
  if [ "$WITH_DBD" = 1 ]; then
    start_dbd
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
  fi
  write_conf "$host" "$acct"
  if [ "$WITH_DBD" = 1 ]; then
    for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n list cluster format=cluster | grep -qw psm || sacctmgr -i add cluster psm >/dev/null
  fi
  alive "$RUND/slurmctld.pid" || /usr/sbin/slurmctld -c   # -c: start with an empty job table
  alive "$RUND/slurmd.pid" || /usr/sbin/slurmd
  for _ in $(seq 60); do sinfo -h -o '%T' 2>/dev/null | grep -qx idle && break; sleep 0.5; done
  if ! sinfo -h -o '%T' | grep -qx idle; then
    echo "the node did not become idle" >&2; tail -n 20 "$LOGD"/slurm*.log >&2; exit 1
  fi
  echo "slurm ready in $((SECONDS - t0)) s"
}

stop_pidfile() {
  local f="$1" pid
  [ -s "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$f"
}

stop() {
  stop_pidfile "$RUND/slurmd.pid"
  stop_pidfile "$RUND/slurmctld.pid"
  stop_pidfile "$RUND/slurmdbd.pid"
  stop_pidfile /run/mysqld/mysqld.pid
  stop_pidfile /run/munge/munged.pid
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
