#!/usr/bin/env bash
# Installs gpt2cube and everything it needs. Idempotent: a second run installs nothing new.
# torch==2.13.0 goes first: on these machines it is the local CPU wheel, and any looser
# requirement met first would pull the newest CUDA build (several GB).
# llama-cpp-python==0.3.36 compiles llama.cpp from source the first time (about 5 minutes on
# 2 cores); pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The routed engine (cpp/) compiles against the ggml that llama-cpp-python just installed. A
# failure here leaves every pure-Python command working; the routed ones then say what is missing.
"$PY" -m gpt2cube engine build >/dev/null || echo "warning: the routed engine did not build; see the message above" >&2
