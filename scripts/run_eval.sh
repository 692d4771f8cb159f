#!/usr/bin/env bash
# Shared by knn_eval.sh, linear_eval.sh, zeroshot_eval.sh: set up .venv, then run
# `python -m repa_ssl.eval.MODULE ARGS...`, under torchrun when NPROC > 1.
#   scripts/run_eval.sh knn|linear|zeroshot ARGS...
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
python="${REPA_SSL_VENV:-$root/.venv}/bin/python"
module="repa_ssl.eval.$1"
shift
if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$python" -m torch.distributed.run --nproc_per_node "$NPROC" -m "$module" "$@"
fi
exec "$python" -m "$module" "$@"
