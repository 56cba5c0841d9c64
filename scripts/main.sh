#!/usr/bin/env bash
# The main job: set up, then convert a model to every type and compare each file, run by
# llama.cpp, with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m gpt2cube.cli demo "$@"
