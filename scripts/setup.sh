#!/usr/bin/env bash
# Set up moe_lab in ./.venv: a CPU build of PyTorch, then the package with its extras.
#   bash scripts/setup.sh            # runtime + notebooks
#   bash scripts/setup.sh --dev      # also the test tools, the corpus builder and the figure tools
#                                    # (extras dev, corpus, figures; figures need a Chromium: see below)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="notebooks"
[ "${1:-}" = "--dev" ] && extras="notebooks,dev,corpus,figures"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
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
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1; then
  # kaleido (the figures extra) draws the notebooks' static PNGs in a headless Chromium: Debian's
  # package where we may install it; elsewhere those tests skip and say why.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
      || echo "could not install chromium: the static-figure tests will be skipped"
  else
    echo "no chromium: the static-figure tests will be skipped (install Chromium to save notebooks with PNGs)"
  fi
fi
.venv/bin/python -c "import torch, moe_lab; print(f'moe_lab {moe_lab.__version__} ready (torch {torch.__version__})')"
