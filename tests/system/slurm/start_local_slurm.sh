#!/usr/bin/env bash
# Start a private single-node Slurm cluster (munged + slurmctld + slurmd) in $1 (default: mktemp -d).
# Prints "export ..." lines to eval. Requires root + Debian packages: slurmctld slurmd slurm-client munge.
# Nothing is written under /etc: key, socket, slurm.conf, spool, logs and pid files all live in $1, and
# clients find the cluster through SLURM_CONF. Ports: CTLD_PORT / SLURMD_PORT (defaults 16817 / 16818).
# Recipe: docs/decisions.md, "Environment"; CPU detection here ignores
# OMP_NUM_THREADS. Stop with stop_local_slurm.sh $1.
set -euo pipefail
D=${1:-$(mktemp -d /tmp/slurm-test.XXXXXX)}
mkdir -p "$D"/{munge,spool/ctld,spool/d,log}
chmod 755 "$D" "$D/munge"
HOST=$(hostname -s)
# Not plain `nproc`: it honours OMP_NUM_THREADS, which tests set to 1, and a 1-CPU node can never run
# `--ntasks=2 --cpus-per-task=1` (the job would pend forever with Reason=PartitionConfig).
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
CTLD_PORT=${CTLD_PORT:-16817}
SLURMD_PORT=${SLURMD_PORT:-16818}

# --- munge: private key + socket, run as root (no /etc/munge, no /run/munge)
[ -f "$D/munge/munge.key" ] || mungekey --create --keyfile="$D/munge/munge.key"
chmod 400 "$D/munge/munge.key"
/usr/sbin/munged --force --socket="$D/munge/munge.sock" --key-file="$D/munge/munge.key" \
  --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" \
  --seed-file="$D/munge/munged.seed"
for i in $(seq 50); do [ -S "$D/munge/munge.sock" ] && break; sleep 0.1; done

cat > "$D/slurm.conf" <<CONF
ClusterName=testcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.sock
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=4
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MailProg=/bin/true
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$D/slurm.conf"

# daemon mode: each writes its pid file; logs go to $D/log
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for i in $(seq 100); do
  sinfo -h -o '%T' 2>/dev/null | grep -q '^idle' && break; sleep 0.2
done
sinfo -h -o '%T' | grep -q '^idle' || { echo "slurm did not become idle; see $D/log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF"
echo "export SLURM_TEST_DIR=$D"
