"""Saving and loading gpt2cube's own torch language models as Hugging Face-style directories:
config.json (the config class's `to_json`) and model.safetensors, checked against the config
before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CorruptCheckpoint


class SafetensorsLM:
    """Mixin for an nn.Module with `config` (a class with to_json / from_json(dict, where))."""

    config_class: type
    tied_keys: tuple[str, ...] = ("lm_head.weight",)  # not stored when the config ties them

    def save_pretrained(self, out: Path) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tied = getattr(self.config, "tie_word_embeddings", False)
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not (tied and k in self.tied_keys)}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: Path, dtype=None):
        import torch
        from safetensors.torch import load_file

        path = Path(path)
        where = path / "config.json"
        try:
            raw = json.loads(where.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpoint(f"{where}: cannot read the config ({e})") from None
        model = cls(cls.config_class.from_json(raw, str(where)))
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise CorruptCheckpoint(f"{path}: no model.safetensors")
        dtype = dtype or torch.float32
        state = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
        want = model.state_dict()
        if set(state) != set(want):
            missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
            raise CorruptCheckpoint(f"{weights}: the weights do not match {where} "
                                    f"({model.describe()}): missing {missing[:4]}, unexpected {extra[:4]}")
        for k, v in want.items():
            if state[k].shape != v.shape:
                raise CorruptCheckpoint(f"{weights}: tensor {k!r} has shape {list(state[k].shape)}, {where} "
                                        f"implies {list(v.shape)}")
        model.load_state_dict(state)
        return model.to(dtype)
