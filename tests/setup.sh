#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian/Ubuntu machine: Debian's Chromium (renders the HTML
# report), PostgreSQL (concurrent workers and the MLflow tracking server), and the project with its dev
# extra in .venv. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
# any browser tests/test_report.py renders with; else Debian's package (Ubuntu's is chromium-browser)
{ command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 || need+=(chromium)
# Debian's and Ubuntu's own python3 make a venv only with python3-venv: try one where none is made yet
if [ ! -x .venv/bin/python ]; then
  try=$(mktemp -d)
  python3 -m venv "$try/venv" >/dev/null 2>&1 || need+=(python3-venv)
  rm -rf "$try"
fi
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev]'
# the MNIST tests read MNIST's official 10k test files beside the clone (no download): say so now, not
# when those tests fail minutes into the run
mnist=../shared/data/MNIST/raw
for f in t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$mnist/$f" ] || echo "warning: $mnist/$f is missing: the MNIST tests will fail (see README, Two commands)" >&2
done
