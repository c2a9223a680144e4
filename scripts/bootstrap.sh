#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine, idempotently:
# Debian packages (the Fashion-MNIST data set), a virtualenv in .venv, torch first (so nothing
# pulls another build), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# chromium: the web client's browser tests (driven by Playwright, no browser download)
# postgresql: the SQL stores' contract tests start a throwaway server (tests/pg.py)
apt_pkgs=(dataset-fashion-mnist chromium postgresql)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch before anything that depends on it, or pip resolves another (multi-GB) build.
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "bootstrap: installing torch (about 1.5 minutes)"
  $PIP install -q torch==2.14.1 torchvision==0.29.1
fi
echo "bootstrap: installing the project"
$PIP install -q -e ".[dev]"
# The Node.js client (clients/node): its pinned npm packages, locally (no global installs).
if command -v npm >/dev/null 2>&1; then
  echo "bootstrap: installing the Node.js client's packages (clients/node)"
  npm ci --prefix clients/node --no-audit --no-fund --silent
else
  echo "bootstrap: npm not found; skipping clients/node (its tests skip without node_modules)"
fi
touch "$VENV/.bootstrapped"
echo "bootstrap: done ($VENV)"
