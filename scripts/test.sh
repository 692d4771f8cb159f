#!/usr/bin/env bash
# Run the test suite; sets up .venv first. Other arguments go to pytest.
#   ./scripts/test.sh           the default tier: changes nothing on the machine (no packages, no daemons)
#   ./scripts/test.sh --slurm   the Slurm tier (root): scripts/local_slurm.sh installs slurm-wlm and munge
#                               if needed and starts a one-node Slurm, stopped again afterwards
#   ./scripts/test.sh --all     both tiers
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tier=()  # the default tier is pyproject.toml's `-m 'not slurm'`; a later -m replaces it
case "${1:-}" in
    -h|--help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;;
    --slurm) tier=(-m slurm); shift ;;
    --all) tier=(-m "slurm or not slurm"); shift ;;
esac
"$root/scripts/setup_env.sh"
cd "$root"
exec "${REPA_SSL_VENV:-$root/.venv}/bin/python" -m pytest "${tier[@]}" "$@"
