#!/usr/bin/env bash
# k-NN evaluation (DINO protocol) of a fused tower; sets up .venv first.
#   scripts/knn_eval.sh CHECKPOINT IMAGENET_DIR [options of `python -m repa_ssl.eval.knn --help`]
# IMAGENET_DIR holds train/ and val/. Several GPUs: NPROC=8 scripts/knn_eval.sh ...
set -euo pipefail
case "${1:-}" in  # the lines above, then every option
    -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" knn --help ;;
esac
if [ $# -lt 2 ]; then
    echo "usage: $0 CHECKPOINT IMAGENET_DIR [options]   (see: python -m repa_ssl.eval.knn --help)" >&2
    exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" knn "$1" --data-path "$2" "${@:3}"
