#!/usr/bin/env bash
# `make test-slurm`: start the throw-away cluster (cluster.sh: installs slurm-wlm and munge with
# apt-get when missing), run the SLURM tests against it, stop the daemons it started (by pid),
# also when the tests fail or are interrupted. A cluster that was already up is left running.
# Skips, with the reason, only where the cluster cannot exist: not root, or slurm-wlm missing
# and no apt-get to install it. Anything else that goes wrong fails.
#
#   bash tests/slurm/run.sh [PYTHON] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${1:-.venv/bin/python}"
shift || true
CLUSTER=tests/slurm/cluster.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "test-slurm: SKIPPED: needs root (cluster.sh links /etc/slurm/slurm.conf and runs slurmd as root)"
    exit 0
fi
if ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; then
    echo "test-slurm: SKIPPED: slurm-wlm is not installed and there is no apt-get to install it"
    exit 0
fi

if bash "$CLUSTER" running; then
    echo "test-slurm: using the cluster that is already running (it stays up)"
else
    trap 'bash "$CLUSTER" stop' EXIT
    bash "$CLUSTER" start
fi
SLURM_TEST=1 "$PYTHON" -m pytest tests/slurm -m slurm -v -s "$@"
