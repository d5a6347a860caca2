#!/usr/bin/env bash
# Install everything the tests need, then run the unit tests and every notebook (nbval, fast mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export MOE_LAB_FAST=1 PYTHONHASHSEED=0
.venv/bin/python -m pytest -p no:cacheprovider -q tests notebooks \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600 "$@"
