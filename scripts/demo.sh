#!/usr/bin/env bash
# The main job: DINO and CLIP on the embedded digits, fused, evaluated, timed, reported (sets up .venv first).
# Extra arguments go to `python -m demo` (see --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${REPA_SSL_VENV:-$root/.venv}/bin/python" -m demo "$@"
