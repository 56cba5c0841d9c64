"""The [prune] table of a recipe file: the pruning half of a recipe whose [types] table
`convert --recipe` reads (recipes/gpt2-124m-63mb.toml)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from ..errors import InputError
from .importance import MEASURES

# key -> (type, what it means); the names are `prune`'s options
KEYS = {"ffn": ((int, float), "fraction below 1 or count of FFN neurons removed per layer"),
        "importance": (str, "name of an importance measure"),
        "multiple_of": (int, "kept width rounded down to a multiple of this"),
        "calib_tokens": (int, "tokens of calibration text"),
        "seed": (int, "seed")}


def load_prune_recipe(path: Path) -> dict:
    """{option: value} from the file's [prune] table, each checked for its type."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    table = data.get("prune")
    if not isinstance(table, dict) or not table:
        raise InputError(f"{path}: no [prune] table; expected e.g. [prune] ffn = 0.25, importance = \"activation\"")
    out = {}
    for key, value in table.items():
        if key not in KEYS:
            raise InputError(f"{path}: [prune] key {key!r} is unknown; expected one of {', '.join(KEYS)}")
        kind, meaning = KEYS[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputError(f"{path}: [prune] {key} = {value!r}; expected the {meaning}")
        out[key] = value
    if out.get("importance", "activation") not in MEASURES:
        raise InputError(f"{path}: [prune] importance = {out['importance']!r}; expected {' | '.join(MEASURES)}")
    return out
