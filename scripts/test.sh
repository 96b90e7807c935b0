#!/usr/bin/env bash
# Installs everything the tests need on a fresh machine, then runs them. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0            # the CPU wheel on this disk; never a multi-GB CUDA build
python3 -m pip install -q -e '.[test,cluster]'      # cluster: Ray, for tests/test_cluster.py
if ! command -v chromium >/dev/null 2>&1; then     # browser tests drive Debian's chromium (downloads of browsers fail)
    (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 || echo "warning: chromium not installed; browser tests will skip"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 -m pytest -q "$@"
