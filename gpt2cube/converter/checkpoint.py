"""Opening a Hugging Face checkpoint directory: config plus weights in any of the layouts
transformers writes (single or sharded safetensors, legacy pytorch_model.bin, sharded .bin).

`Checkpoint.load(name)` returns one tensor as float32; nothing else is held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CheckpointNotFound, CorruptCheckpoint
from .safetensors_io import SafetensorsFile

WEIGHT_LAYOUTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class Checkpoint:
    path: Path
    config: dict
    files: list[Path]  # weight files actually read, in a stable order
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)
    _loaders: dict[str, Callable[[], np.ndarray]] = field(repr=False)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        return self._loaders[name]()


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointNotFound(
            f"{path}: no config.json; expected a Hugging Face checkpoint directory "
            "(config.json plus model.safetensors or pytorch_model.bin)"
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return config


def open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such directory; expected a Hugging Face checkpoint directory")
    if not path.is_dir():
        raise CheckpointNotFound(f"{path}: not a directory; expected a Hugging Face checkpoint directory")
    config = read_config(path)
    present = [name for name in WEIGHT_LAYOUTS if (path / name).is_file()]
    if not present:
        raise CheckpointNotFound(f"{path}: no weights found; expected one of {', '.join(WEIGHT_LAYOUTS)}")
    layout = present[0]  # safetensors preferred over .bin when both exist
    shapes: dict[str, tuple[int, ...]] = {}
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    files = _shard_files(path, layout)
    for f in files:
        if not f.is_file():
            raise CheckpointNotFound(f"{path / layout}: lists shard {f.name} which does not exist")
        reader = _open_safetensors if f.suffix == ".safetensors" else _open_torch_bin
        for name, (shape, loader) in reader(f).items():
            shapes[name] = shape
            loaders[name] = loader
    return Checkpoint(path, config, files, shapes, loaders)


def _shard_files(path: Path, layout: str) -> list[Path]:
    if not layout.endswith(".index.json"):
        return [path / layout]
    index_path = path / layout
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpoint(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})") from None


def _open_safetensors(f: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    st = SafetensorsFile(f)
    return {n: (st.shape(n), (lambda n=n: st.load(n))) for n in st.names()}


def _open_torch_bin(f: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    import torch  # only the legacy format needs torch

    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "unreadable"
        raise CorruptCheckpoint(
            f"{f}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt"
        ) from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{f}: expected a state dict, got {type(state).__name__}")
    return {
        n: (tuple(t.shape), (lambda t=t: t.detach().to(torch.float32).numpy().copy()))
        for n, t in state.items()
        if isinstance(t, torch.Tensor)
    }
