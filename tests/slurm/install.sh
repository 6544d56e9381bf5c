#!/usr/bin/env bash
# Installs the Debian packages of a one-machine SLURM cluster (controller, node daemon, clients, munge) for
# tests/test_slurm.py, which starts and stops its own daemons (tests/slurm/cluster.py). Needs root and apt;
# it only installs: package services are not started here (the tests run their own daemons on loopback).
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { timeout 900 apt-get install -y --no-install-recommends "${PACKAGES[@]}"; }
# A fresh machine may have no package lists yet: update only when the first try cannot resolve.
install || { timeout 600 apt-get update && install; }
