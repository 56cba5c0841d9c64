#!/usr/bin/env bash
# Installs gpt2cube and everything it needs. Idempotent: a second run installs nothing new.
# torch==2.13.0 goes first: on these machines it is the local CPU wheel, and any looser
# requirement met first would pull the newest CUDA build (several GB).
# llama-cpp-python==0.3.36 is compiled from source (about 6 minutes on 2 cores) without ggml's
# AMX kernels, into a wheel cached under ~/.cache/gpt2cube/wheels (GPT2CUBE_CACHE moves it), so a
# new venv installs it in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet "torch==2.13.0"

# ggml's AMX matmul kernels (built in by -march=native on CPUs that report AMX) die with SIGILL in
# their worker threads on such machines, this one included: the tile configuration is not loaded
# in each thread (upstream llama.cpp PR 26954). An explicit -mno-amx-* wins over -march=native,
# so the build keeps every other native instruction set.
LLAMA="llama-cpp-python==0.3.36"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
WHEELS="${GPT2CUBE_CACHE:-$HOME/.cache/gpt2cube}/wheels/llama-cpp-python-0.3.36-no-amx"
llama_ok() {  # installed, and its CPU backend has no AMX kernels
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llama_cpp")
if spec is None or spec.origin is None:
    sys.exit(1)
libs = list((pathlib.Path(spec.origin).parent / "lib").glob("libggml-cpu*"))
sys.exit(0 if libs and not any(b"ggml_backend_amx_mul_mat" in p.read_bytes() for p in libs) else 1)
PYEOF
}
if ! llama_ok; then
  if ! compgen -G "$WHEELS/llama_cpp_python-*.whl" >/dev/null; then
    echo "building $LLAMA from source without AMX kernels (about 6 minutes on 2 cores, once) ..." >&2
    mkdir -p "$WHEELS"
    CFLAGS="$NO_AMX" CXXFLAGS="$NO_AMX" "${PIP[@]}" wheel --quiet --no-deps --no-cache-dir \
      --no-binary llama-cpp-python -w "$WHEELS" "$LLAMA"
  fi
  "${PIP[@]}" install --quiet --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-*.whl
  "${PIP[@]}" install --quiet "$LLAMA"  # its own dependencies (already satisfied by the wheel itself)
fi
"${PIP[@]}" install --quiet -e ".[test]"
# The routed engine (cpp/) compiles against the ggml that llama-cpp-python just installed. A
# failure here leaves every pure-Python command working; the routed ones then say what is missing.
"$PY" -m gpt2cube engine build >/dev/null || echo "warning: the routed engine did not build; see the message above" >&2
