#!/usr/bin/env bash
# The speed benchmark suite (python -m repa_ssl.bench); sets up .venv first. Extra args go to it, e.g.
#   scripts/benchmark.sh --models vit_b16 clip_b16 --thetas 0.5 0.75 --threads 2
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "${REPA_SSL_VENV:-$root/.venv}/bin/python" -m repa_ssl.bench "$@"
