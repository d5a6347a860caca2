#!/usr/bin/env bash
# Find, or install, the Chromium that the browser test of the explorer drives
# (tests/test_browser_explorer.py, through Playwright). It never downloads a browser build: it uses
# the system's Chromium, installing Debian's `chromium` package with apt-get when run as root.
#   bash scripts/install_browser.sh      # prints the browser's path, or why there is none
# Exits 0 either way: without a browser the test is skipped and prints this reason.
# MOE_LAB_CHROMIUM=/path/to/chromium picks another build (the test reads it too).
set -uo pipefail

find_chromium() {
  if [ -n "${MOE_LAB_CHROMIUM:-}" ]; then command -v "$MOE_LAB_CHROMIUM"; return; fi
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" && return 0
  done
  return 1
}

if path=$(find_chromium); then
  echo "browser for the explorer test: $path ($("$path" --version 2>/dev/null | head -n1))"
  exit 0
fi
if [ -n "${MOE_LAB_CHROMIUM:-}" ]; then
  echo "MOE_LAB_CHROMIUM=$MOE_LAB_CHROMIUM is not an executable: the browser test will be skipped"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium (apt-get) for the browser test of the explorer ..."
  export DEBIAN_FRONTEND=noninteractive
  # a fresh package list first: an old one may point at versions the mirror no longer has
  if timeout 900 apt-get update -qq >/dev/null 2>&1 \
      && timeout 900 apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      && path=$(find_chromium); then
    echo "browser for the explorer test: $path ($("$path" --version 2>/dev/null | head -n1))"
  else
    echo "apt-get could not install chromium: the browser test will be skipped"
  fi
  exit 0
fi
echo "no Chromium found and none installed (needs root and apt-get with Debian's chromium package);" \
     "the browser test will be skipped: install chromium with your package manager, or set MOE_LAB_CHROMIUM"
exit 0
