#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the
# project with its pinned dependencies. Idempotent: it reinstalls only when
# pyproject.toml changed since the last successful install. REPA_SSL_VENV=DIR puts the
# environment elsewhere; PYTHON=python3.X picks the interpreter that creates it.
#   scripts/setup_env.sh     (the other scripts run it first)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,6s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REPA_SSL_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup_env] creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.repa_ssl_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup_env] installing repa-ssl and its dependencies (first run: a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    echo "$want" > "$stamp"
fi
