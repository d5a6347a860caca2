#!/usr/bin/env bash
# Run every test, each in the environment it is about (-rs prints why each skipped test was skipped):
#  1. the learner's environment, built exactly as the README's first command builds it (scripts/setup.sh
#     without --dev, here in .venv-learner) plus only the test runners (pytest, nbval): every notebook and
#     every worked solution runs there, under nbval in fast mode. A notebook that needs a package only the
#     dev extras install fails here, as it would for a learner.
#  2. the developer's environment (.venv, scripts/setup.sh --dev): the unit tests (the explorer's browser
#     test, the spell check and the link check among them). Arguments go to this pytest run.
# The notebooks run once (in 1), so the second environment costs its install time only (pip's wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
export MOE_LAB_FAST=1 PYTHONHASHSEED=0
MOE_LAB_VENV=.venv-learner bash scripts/setup.sh
.venv-learner/bin/python -m pip install -q "pytest>=8.0" "nbval>=0.11"
.venv-learner/bin/python -m pytest -p no:cacheprovider -q -rs notebooks \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=600
bash scripts/setup.sh --dev
.venv/bin/python -m pytest -p no:cacheprovider -q -rs tests "$@"
