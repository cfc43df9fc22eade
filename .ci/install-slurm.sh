#!/usr/bin/env bash
# CI: install what tests/integration/test_slurm.py needs for its single-node SLURM cluster
# (Debian/Ubuntu packages) and the SLURM executor plugin into ./.venv. Never fails the CI run:
# where it cannot install (not root, no apt-get), it says so and the SLURM tests skip,
# naming the step that failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip install --quiet -e ".[slurm]" >/tmp/install-slurm-pip.log 2>&1 \
    || echo "install-slurm: pip install -e '.[slurm]' failed; the SLURM tests will skip"
fi

packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
have_all=1
for bin in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || have_all=0
done
if [ "$have_all" = 1 ]; then
  echo "install-slurm: SLURM, munge and mariadb are already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm: not root or no apt-get; not installing ${packages[*]} (the SLURM tests will skip)"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the packages' services from starting at install time (the test starts its own daemons).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
fi
status=0
apt-get update -qq || status=$?
if [ "$status" = 0 ]; then
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${packages[@]}" >/tmp/install-slurm.log 2>&1 || status=$?
fi
[ "$created_policy" = 1 ] && rm -f "$policy"
if [ "$status" != 0 ]; then
  echo "install-slurm: apt-get failed (exit $status; see /tmp/install-slurm.log); the SLURM tests will skip"
  tail -n 20 /tmp/install-slurm.log 2>/dev/null
  exit 0
fi
echo "install-slurm: installed ${packages[*]}"
