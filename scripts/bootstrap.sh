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
# libopencv-dev libturbojpeg0-dev pkg-config: ffcv builds against them (builder data as .beton)
apt_pkgs=(dataset-fashion-mnist chromium postgresql libopencv-dev libturbojpeg0-dev pkg-config)
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
# ffcv (builder data as FFCV .beton files) compiles against OpenCV and libjpeg-turbo, so it is an
# extra, not a dependency: where it fails to build the setup goes on and records why in the marker,
# so that its tests skip with that reason (even under CI) rather than fail as never tried.
ffcv_marker="$VENV/ffcv-unavailable"
if "$VENV/bin/python" -c "import ffcv" >/dev/null 2>&1; then
  rm -f "$ffcv_marker"
else
  echo "bootstrap: installing ffcv (FFCV .beton builder data)"
  ffcv_log=$(mktemp)
  if PIP_PROGRESS_BAR=off $PIP install -q "ffcv==1.0.2" pillow >"$ffcv_log" 2>&1 \
      && "$VENV/bin/python" -c "import ffcv" >>"$ffcv_log" 2>&1; then
    rm -f "$ffcv_marker"
  else
    { echo "pip install ffcv==1.0.2 failed at $(date -u +%FT%TZ): $(tail -n 1 "$ffcv_log")"; } >"$ffcv_marker"
    echo "bootstrap: WARNING: ffcv could not be installed; .beton builder data is refused here and" \
      "its tests skip. Its last lines:" >&2
    tail -n 5 "$ffcv_log" >&2
  fi
  rm -f "$ffcv_log"
fi
# The Node.js client (clients/node): its pinned npm packages, locally (no global installs).
# npm ci is known to hang now and then after its downloads finish (npm/cli#5721; seen once here: a CI
# run stalled in it until the 90-minute limit). So each try is bounded, fetches fail fast instead of
# waiting npm's default 5 minutes, a stalled try is retried on a clean node_modules, and if every try
# fails the setup goes on without the Node.js client: its tests (and the buf checks) then skip with
# that reason instead of the whole run hanging.
npm_ci() {
  local try log
  for try in 1 2 3; do
    log=$(mktemp)
    if timeout --kill-after=10 240 npm ci --prefix clients/node --no-audit --no-fund \
        --fetch-timeout=60000 --fetch-retries=3 --loglevel=warn </dev/null >"$log" 2>&1; then
      rm -f "$log"
      return 0
    fi
    echo "bootstrap: npm ci try $try failed or stalled; its last lines:" >&2
    tail -n 5 "$log" >&2
    rm -f "$log"
    rm -rf clients/node/node_modules
  done
  return 1
}
if command -v npm >/dev/null 2>&1; then
  echo "bootstrap: installing the Node.js client's packages (clients/node)"
  # The marker tells the tests that the install was tried and failed (so they skip, with this
  # reason, even under CI) rather than never tried (which fails them under CI).
  marker="$VENV/node-client-unavailable"
  if npm_ci; then
    rm -f "$marker"
  else
    echo "npm ci --prefix clients/node failed 3 times at $(date -u +%FT%TZ)" >"$marker"
    echo "bootstrap: WARNING: clients/node packages could not be installed; the Node.js client" \
      "tests and buf checks will skip (rerun: npm ci --prefix clients/node)" >&2
  fi
else
  echo "bootstrap: npm not found; skipping clients/node (its tests skip without node_modules)"
fi
touch "$VENV/.bootstrapped"
echo "bootstrap: done ($VENV)"
