"""Which encoding each tensor gets: the recipe.

Layers of the decision, later ones winning:
  1. norms and biases: always f32 (ggml's norm and add kernels read them as f32);
  2. linear layers (attn_qkv, attn_output, ffn_up, ffn_down): `--type`;
  3. token/position embeddings and the output head: `--embed-type` (default q6_k when `--type`
     is ternary, otherwise `--type`; a `finetune --qat` checkpoint converts with the embedding
     type it was trained for);
  4. `--recipe FILE` patterns (fnmatch globs over GGUF tensor names -> type), file order, last
     match wins; they apply to weight matrices only.
A row length (ne0) a type cannot hold follows the type's fallback chain (tq*/q4_k -> q4_0 ->
f16) with one warning listing the tensors, or fails with `--strict`.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..kernels import QUANT_TYPES, QuantType, get_quant_type
from ..kernels.ternary import FITTED_SCALE_MODES, SCALE_MODES
from .arch import TensorSpec

EMBED_ROLES = ("token_embd", "position_embd", "output")
# Embeddings and head under ternary linear layers: q6_k, as llama.cpp's own TQ files keep
# token_embd. On the reference it costs nothing measurable against q8_0 (KL from f16 0.5762 vs
# 0.5763, PPL 210.07 vs 209.51, 13.73 vs 16.88 MB; benchmarks/ptq.py). The routed engine runs q6_k;
# the gap once seen between its expert and dense paths with these embeddings (0.054 x std of the
# logits) is float summation order amplified by activation rounding, not q6_k (tests/test_engine.py).
TERNARY_EMBED_TYPE = "q6_k"
# `finetune --qat` of a ternary type keeps q8_0 embeddings unless asked (the recovery figures were
# measured with them); the checkpoint records the type, and `convert` takes it from there.
QAT_TERNARY_EMBED_TYPE = "q8_0"


@dataclass
class Recipe:
    linear: str = "f16"
    embed: str | None = None
    patterns: list[tuple[str, str]] = field(default_factory=list)
    ternary_scale: str = "tensor"
    strict: bool = False

    @property
    def embed_type(self) -> str:
        if self.embed is not None:
            return self.embed
        return TERNARY_EMBED_TYPE if get_quant_type(self.linear).is_ternary else self.linear


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    qtype: type[QuantType]

    @property
    def nbytes(self) -> int:
        return self.qtype.nbytes(self.spec.shape)


def load_recipe_file(path: Path) -> list[tuple[str, str]]:
    """TOML or JSON: either a flat mapping or a [types] table of pattern -> type."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the recipe ({e.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise InputError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("types"), dict):
        data = data["types"]
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a table of tensor-name pattern -> type, e.g. \"blk.*.ffn_down.weight\" = \"tq2_0\"")
    patterns = []
    for pattern, qtype in data.items():
        if not isinstance(qtype, str) or qtype not in QUANT_TYPES:
            raise InputError(
                f"{path}: pattern {pattern!r} has type {qtype!r}; expected one of {', '.join(sorted(QUANT_TYPES))}"
            )
        patterns.append((pattern, qtype))
    return patterns


def plan_types(specs: list[TensorSpec], recipe: Recipe | str) -> tuple[list[PlannedTensor], list[str]]:
    if isinstance(recipe, str):
        recipe = Recipe(linear=recipe)
    f32 = get_quant_type("f32")
    matrices = [s for s in specs if len(s.shape) == 2 and s.role not in ("norm", "bias")]
    for pattern, _ in recipe.patterns:
        if not any(fnmatch.fnmatchcase(s.gguf_name, pattern) for s in matrices):
            raise InputError(f"recipe pattern {pattern!r} matches no weight matrix (e.g. blk.0.ffn_up.weight)")
    planned: list[PlannedTensor] = []
    fell_back: dict[tuple[str, str], list[str]] = {}
    for s in specs:
        if s not in matrices:
            planned.append(PlannedTensor(s, f32))
            continue
        name = recipe.embed_type if s.role in EMBED_ROLES else recipe.linear
        for pattern, qtype in recipe.patterns:
            if fnmatch.fnmatchcase(s.gguf_name, pattern):
                name = qtype
        qtype = get_quant_type(name)
        while not qtype.row_ok(s.shape[-1]):
            if recipe.strict or qtype.fallback is None:
                raise InputError(
                    f"tensor {s.gguf_name} has rows of {s.shape[-1]} weights, not a multiple of {qtype.block_size}, "
                    f"so it cannot be {qtype.name}" + ("; drop --strict to fall back" if recipe.strict else "")
                )
            qtype = get_quant_type(qtype.fallback)
        if qtype.name != name:
            fell_back.setdefault((name, qtype.name), []).append(f"{s.gguf_name} (row {s.shape[-1]})")
        planned.append(PlannedTensor(s, qtype))
    warnings = [
        f"{len(names)} tensor(s) have rows that do not fit {want}'s blocks of {get_quant_type(want).block_size}; "
        f"writing them as {got}: {', '.join(names)}"
        for (want, got), names in fell_back.items()
    ]
    return planned, warnings


DEFAULT_TERNARY_SCALE = "tensor"


def ternary_scale_for(src: Path, requested: str | None, log: Callable[[str], None],
                      default: str = DEFAULT_TERNARY_SCALE) -> str:
    """The ternary scale rule to convert SRC with: the one asked for, else the one a ternary QAT
    trained it with, else `default`; asking for another than QAT's is obeyed with a warning."""
    trained = recorded_ternary_scale(src) if Path(src).is_dir() else None
    if requested is None:
        return trained or default
    if trained is not None and requested != trained:
        log(f"warning: {src} was quantization-aware trained with --ternary-scale {trained} (finetune.json); "
            f"--ternary-scale {requested} stores other ternary values than it was trained on")
    return requested


def embed_type_for(src: Path, requested: str | None) -> str | None:
    """The embedding type to convert SRC with: the one asked for, else the one a `finetune --qat`
    checkpoint was trained for (token_embd in its record), else None (the recipe's default)."""
    if requested is not None or not Path(src).is_dir():
        return requested
    record = _finetune_record(Path(src))
    if record is None or not record["config"].get("qat"):
        return None
    trained = (record.get("qat_tensor_types") or {}).get("token_embd.weight")
    return trained if isinstance(trained, str) and trained in QUANT_TYPES else None


def _finetune_record(src: Path) -> dict | None:
    """A checkpoint's finetune.json, checked to be the object `gpt2cube finetune` writes; None without one."""
    path = src / "finetune.json"
    if not path.is_file():
        return None
    expected = "expected the JSON object `gpt2cube finetune` writes"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the fine-tuning record ({e}); {expected}") from None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise InputError(f"{path}: no 'config' object in the fine-tuning record; {expected}")
    return record


def recorded_ternary_scale(src: Path) -> str | None:
    """The ternary scale rule a `finetune --qat` checkpoint was trained with (its finetune.json),
    None when SRC holds no record of a ternary QAT. Converting with another rule would store
    other values than the training forward pass used, losing what QAT recovered."""
    path = Path(src) / "finetune.json"
    record = _finetune_record(Path(src))
    if record is None:
        return None
    config = record["config"]
    if not config.get("qat"):
        return None
    # the types QAT trained each tensor for (a recipe may make some ternary under another --qat)
    types = record.get("qat_tensor_types")
    types = list(types.values()) if isinstance(types, dict) else [config["qat"]]
    if not any(t in QUANT_TYPES and get_quant_type(t).is_ternary for t in types if isinstance(t, str)):
        return None
    scale = config.get("ternary_scale", DEFAULT_TERNARY_SCALE)
    if scale not in SCALE_MODES + FITTED_SCALE_MODES:
        raise InputError(f"{path}: config.ternary_scale is {scale!r}; expected one of "
                         f"{', '.join(SCALE_MODES + FITTED_SCALE_MODES)}")
    return scale
