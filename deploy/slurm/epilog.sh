#!/bin/sh
# Slurm Epilog: takes the job's GPUs back (see prolog.sh). A process of the job that still holds a
# GPU open is listed, and reported as an alert; the grant ends with the job's cgroup in any case.
set -eu
agent=${EBPFMON_AGENT:-job_${SLURM_JOB_ID:?SLURM_JOB_ID is unset: run by Slurm as the Epilog}}
exec ${EBPFMON:-/opt/ebpfmon/venv/bin/ebpfmon} gpu revoke "$agent"
