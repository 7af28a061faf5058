#!/bin/sh
# Slurm Prolog: gives the job's agent cgroup the GPUs Slurm allocated it before the job starts;
# ebpfmon's device program refuses it every other GPU. In slurm.conf:
#   Prolog=/etc/ebpfmon/slurm/prolog.sh   Epilog=/etc/ebpfmon/slurm/epilog.sh   PrologFlags=Alloc
# and in ebpfmon's configuration, with Slurm's cgroup/v2 plugin, the jobs as agents:
#   agent_root: /system.slice/slurmstepd.scope    gpu_entitled: []
# A grant made before the job's cgroup exists applies when Slurm makes it.
# EBPFMON_AGENT names the cgroup below the agent root (default job_<id>); EBPFMON the command
# (make install writes its venv here).
set -eu
agent=${EBPFMON_AGENT:-job_${SLURM_JOB_ID:?SLURM_JOB_ID is unset: run by Slurm as the Prolog}}
gpus=${SLURM_JOB_GPUS:-}
if [ -z "$gpus" ]; then
    exec ${EBPFMON:-/opt/ebpfmon/venv/bin/ebpfmon} gpu revoke "$agent"  # a job without GPUs gets none, whatever the globs say
fi
exec ${EBPFMON:-/opt/ebpfmon/venv/bin/ebpfmon} gpu grant "$agent" --gpus "$gpus"
