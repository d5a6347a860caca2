#!/usr/bin/env bash
# Set up moe_lab in ./.venv: a CPU build of PyTorch, then the package with its extras.
#   bash scripts/setup.sh            # runtime + notebooks + the corpus builder: every notebook runs
#                                    # (extras notebooks, corpus; notebooks 07 and 08 build the corpus)
#   bash scripts/setup.sh --dev      # also the test tools, the spell checker, the figure tools and the
#                                    # browser test (extras dev, figures, browser; Chromium via
#                                    # scripts/install_browser.sh)
# MOE_LAB_VENV=DIR puts the environment in DIR instead of .venv (scripts/test.sh builds the learner's
# environment, exactly as the first command above does, in .venv-learner).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="notebooks,corpus"
[ "${1:-}" = "--dev" ] && extras="notebooks,corpus,dev,figures,browser"
PY=${PYTHON:-python3}
VENV=${MOE_LAB_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # A CPU build of torch: from a local wheel where this machine has one (PIP_FIND_LINKS),
  # from PyTorch's CPU index on Linux, from PyPI elsewhere (macOS and Windows wheels are CPU builds).
  if ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0* >/dev/null 2>&1; then
    pip install -q "torch==2.13.0"
  elif [ "$(uname -s)" = "Linux" ]; then
    pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
  else
    pip install -q "torch>=2.5"
  fi
fi
pip install -q -e ".[${extras}]"
# the browser test of the explorer and the notebooks' static PNGs (kaleido) use the system's Chromium
# (never a downloaded browser build); without one those tests skip and say why
if [ "${1:-}" = "--dev" ]; then bash scripts/install_browser.sh; fi
"$VENV/bin/python" -c "import torch, moe_lab; print(f'moe_lab {moe_lab.__version__} ready (torch {torch.__version__})')"
