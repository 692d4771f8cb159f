#!/usr/bin/env bash
# Every GPU path in one command (python -m repa_ssl.gpu_check): DINO fp16/bf16, CLIP amp, nccl with the
# synchronised BatchNorm, fused exports, k-NN / zero-shot, the CUDA benchmark and the batch-1 latency of depth merging,
# sized for under 8 minutes on one GPU (untried);
# gpu_check.json and gpu_check.md in --output-dir. Without CUDA it says so and exits 0. Sets up .venv first.
#   scripts/gpu_check.sh --output-dir outputs/gpu_check
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${REPA_SSL_VENV:-$root/.venv}/bin/python"
case "${1:-}" in -h|--help) sed -n '2,6s/^# \{0,1\}//p' "$0"; cd "$root"; exec "$python" -m repa_ssl.gpu_check --help ;; esac
"$root/scripts/setup_env.sh"
cd "$root"
exec "$python" -m repa_ssl.gpu_check "$@"
