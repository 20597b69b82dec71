#!/usr/bin/env bash
# System packages the multi-host tests use: iproute2 (network namespaces as hosts), and SLURM with munge
# (tests/test_slurm.py runs cluster/slurm/distsft.sbatch on a real controller and two nodes). Installed
# only as root where apt-get exists and they are missing; without them those tests skip, saying why.
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
if [ ${#need[@]} -eq 0 ] || [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  exit 0
fi
echo "installing ${need[*]} for the multi-host tests"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
