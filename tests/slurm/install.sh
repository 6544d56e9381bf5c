#!/usr/bin/env bash
# Installs the Debian packages of a one-machine SLURM cluster (controller, node daemon, clients, munge) for
# tests/test_slurm.py, which starts and stops its own daemons (tests/slurm/cluster.py). Needs root and apt;
# it only installs: package services are not started here (the tests run their own daemons on loopback).
#
#   tests/slurm/install.sh                 install, or fail
#   tests/slurm/install.sh --if-possible   (make test) install where this is root with apt-get; elsewhere, or
#                                          when apt fails, say why and exit 0: the SLURM tests then skip with
#                                          that reason, or fail under CI=true (tests/slurm/cluster.py)
# Either way, nothing is done (and apt is not called) when the programs are already installed.
set -euo pipefail
IF_POSSIBLE=0
[[ "${1:-}" == "--if-possible" ]] && IF_POSSIBLE=1
PACKAGES=(slurmctld slurmd slurm-client munge)
# where tests/slurm/cluster.py looks: PATH, then the sbin folders a non-login PATH may lack
PATH="$PATH:/usr/sbin:/sbin"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null; then
  exit 0
fi
cannot() {
  if (( IF_POSSIBLE )); then
    echo "tests/slurm/install.sh: SLURM is not installed and $1: the tests marked slurm will be skipped" \
         "(and fail under CI=true)" >&2
    exit 0
  fi
  echo "tests/slurm/install.sh: $1" >&2
  exit 1
}
[[ "$(id -u)" == 0 ]] || cannot "installing it needs root"
command -v apt-get >/dev/null || cannot "installing it needs apt-get"
export DEBIAN_FRONTEND=noninteractive
echo "tests/slurm/install.sh: installing ${PACKAGES[*]} (apt-get)" >&2
install() { timeout 900 apt-get install -y --no-install-recommends "${PACKAGES[@]}"; }
# A fresh machine may have no package lists yet: update only when the first try cannot resolve.
install || { timeout 600 apt-get update && install; } || cannot "apt-get could not install ${PACKAGES[*]}"
