#!/usr/bin/env bash
# The main job on the embedded default data (scikit-learn's digits); sets up .venv first.
# Extra arguments go to `python -m repa_ssl.demo` (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${REPA_SSL_VENV:-$root/.venv}/bin/python" -m repa_ssl.demo "$@"
