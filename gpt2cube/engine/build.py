"""Builds cpp/ into a shared library against the ggml that llama-cpp-python installed.

The library must match that ggml's ABI exactly, so it is built on the machine, keyed by the
sources and the wheel's libraries, and cached under $GPT2CUBE_CACHE (default ~/.cache/gpt2cube)
/engine/<key>/. CMake is used when present, else the C++ compiler directly. Nothing here is
imported by the pure-Python commands: a failed build only disables the routed ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import Gpt2cubeError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "CMakeLists.txt", ROOT / "cpp" / "gpt2cube_engine.cpp", ROOT / "cpp" / "gpt2cube_engine.h"]
LIB_NAME = "libgpt2cube_engine.so" if sys.platform != "darwin" else "libgpt2cube_engine.dylib"


class EngineUnavailable(Gpt2cubeError):
    """The routed engine cannot be built or loaded here; the message says what is missing."""

    exit_code = 4


def ggml_dirs() -> tuple[Path, Path]:
    """(include dir, library dir) of the llama-cpp-python wheel's ggml."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable("llama-cpp-python is not installed; the engine builds against its ggml "
                                "(pip install llama-cpp-python==0.3.36)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    include, lib = pkg.parent / "include", pkg / "lib"
    if not (include / "ggml.h").is_file() or not (include / "gguf.h").is_file():
        raise EngineUnavailable(f"{include}: ggml headers (ggml.h, gguf.h) not found; the llama-cpp-python "
                                "install does not ship them")
    if not any(lib.glob("libggml-base.*")):
        raise EngineUnavailable(f"{lib}: libggml-base not found in the llama-cpp-python install")
    return include, lib


def cache_root() -> Path:
    return Path(os.environ.get("GPT2CUBE_CACHE", Path.home() / ".cache" / "gpt2cube")) / "engine"


def build_key(lib_dir: Path) -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    for lib in sorted(lib_dir.glob("libggml*")):
        st = lib.stat()
        h.update(f"{lib.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def library_path(build: bool = True, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The engine library, built first if needed (and allowed)."""
    missing = [str(s) for s in SOURCES if not s.is_file()]
    if missing:
        raise EngineUnavailable(f"engine sources not found ({', '.join(missing)}); install gpt2cube from its source tree")
    include, lib_dir = ggml_dirs()
    out_dir = cache_root() / build_key(lib_dir)
    lib = out_dir / LIB_NAME
    if lib.is_file():
        return lib
    if not build:
        raise EngineUnavailable(f"the engine is not built ({lib}); run `gpt2cube engine build`")
    log(f"building the routed engine against {lib_dir} ...")
    tmp = out_dir.with_name(out_dir.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if shutil.which("cmake"):
            _run(["cmake", "-S", str(ROOT), "-B", str(tmp / "build"), f"-DGGML_INCLUDE_DIR={include}",
                  f"-DGGML_LIB_DIR={lib_dir}", "-DCMAKE_BUILD_TYPE=Release"])
            _run(["cmake", "--build", str(tmp / "build"), "-j", str(os.cpu_count() or 2)])
            shutil.copy2(tmp / "build" / LIB_NAME, tmp / LIB_NAME)
        else:
            cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
            if not cxx:
                raise EngineUnavailable("no C++ compiler (c++, g++ or clang++) and no cmake on PATH; "
                                        "install one to use the routed engine")
            _run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include}", f"-I{ROOT / 'cpp'}",
                  str(ROOT / "cpp" / "gpt2cube_engine.cpp"), "-o", str(tmp / LIB_NAME), f"-L{lib_dir}",
                  "-lggml", "-lggml-base", f"-Wl,-rpath,{lib_dir}"])
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {lib}")
    return lib


def _run(cmd: list[str]) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise EngineUnavailable(f"cannot run {cmd[0]} ({e.strerror})") from None
    if r.returncode:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise EngineUnavailable(f"building the routed engine failed ({' '.join(cmd[:2])} ...):\n{tail}")
