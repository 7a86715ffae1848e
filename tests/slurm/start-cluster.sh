#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost (Debian's slurm-wlm and munge; run as root).
# Used by tests/test_slurm.py and .ci/run; idempotent: a running cluster is left alone.
set -euo pipefail
command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed (apt-get install slurm-wlm munge)" >&2; exit 2; }
if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then exit 0; fi

node=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge /var/lib/munge /var/log/munge

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=bidsharmony-test
SlurmctldHost=${node}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=${node} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
# Slurm 22.05 has no "disabled" cgroup plugin; with proctrack/linuxproc and task/none it only
# needs the cgroup filesystem to be detectable.
rm -f /etc/slurm/cgroup.conf

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then exit 0; fi
  sleep 1
done
echo "SLURM did not come up; logs in /var/log/slurm" >&2
tail -n 20 /var/log/slurm/*.log >&2 || true
exit 1
