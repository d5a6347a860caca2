#!/usr/bin/env bash
# Install everything the tests need, then run the unit tests (the explorer's browser test among them)
# and every notebook (nbval, fast mode). -rs prints why each skipped test was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export MOE_LAB_FAST=1 PYTHONHASHSEED=0
.venv/bin/python -m pytest -p no:cacheprovider -q -rs tests notebooks \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600 "$@"
