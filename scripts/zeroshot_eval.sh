#!/usr/bin/env bash
# Zero-shot ImageNet (OpenCLIP protocol) with a CLIP model's fused image tower; sets up .venv first.
#   scripts/zeroshot_eval.sh CHECKPOINT IMAGENET_VAL_DIR [MODEL] [options of `python -m repa_ssl.eval.zeroshot --help`]
# MODEL is the OpenCLIP name (e.g. RePa-ViT-B-16) when no sidecar JSON or params.txt names it.
# Several GPUs: NPROC=8 scripts/zeroshot_eval.sh ...
set -euo pipefail
case "${1:-}" in  # the lines above, then every option
    -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" zeroshot --help ;;
esac
if [ $# -lt 2 ]; then
    echo "usage: $0 CHECKPOINT IMAGENET_VAL_DIR [MODEL] [options]   (see: python -m repa_ssl.eval.zeroshot --help)" >&2
    exit 2
fi
args=("$1" "$2")
shift 2
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    args+=(--model "$1")
    shift
fi
exec "$(dirname "${BASH_SOURCE[0]}")/run_eval.sh" zeroshot "${args[@]}" "$@"
