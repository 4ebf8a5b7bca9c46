#!/usr/bin/env bash
# Thin wrapper around scripts/run_ablations.py (see its docstring), one thread per process by default:
#   bash scripts/run_ablations.sh --data toy_data --budget-min 10
#   bash scripts/run_ablations.sh --variants clip_flow,clip_mse --budget-min 5 --out outputs/ablations_claims
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" scripts/run_ablations.py "$@"
