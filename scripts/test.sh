#!/usr/bin/env bash
# Run the test suite; sets up .venv first. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${REPA_SSL_VENV:-$root/.venv}/bin/python" -m pytest "$@"
