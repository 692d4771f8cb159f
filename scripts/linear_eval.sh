#!/usr/bin/env bash
# Linear probe (DINO protocol) of a fused tower; sets up .venv first.
#   scripts/linear_eval.sh CHECKPOINT IMAGENET_DIR [options of `python -m repa_ssl.eval.linear --help`]
# IMAGENET_DIR holds train/ and val/. Several GPUs: NPROC=8 scripts/linear_eval.sh ...
set -euo pipefail
case "${1:-}" in  # the lines above, then every option
    -h|--help) sed -n '2,4s/^# \{0,1\}//p' "$0"; exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" linear --help ;;
esac
if [ $# -lt 2 ]; then
    echo "usage: $0 CHECKPOINT IMAGENET_DIR [options]   (see: python -m repa_ssl.eval.linear --help)" >&2
    exit 2
fi
exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" linear "$1" --data-path "$2" "${@:3}"
