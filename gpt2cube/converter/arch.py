"""Architectures the converter knows, as a registry: `@register_arch("GPT2LMHeadModel")`.

An architecture reads its hyper-parameters from config.json (checking the ones llama.cpp cannot
honour), maps checkpoint tensors to GGUF tensors (names, transposes, expected shapes) and
writes its `{arch}.*` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGUFWriter

from ..errors import CorruptCheckpoint, InputError, ShapeMismatch, UnsupportedArchitecture
from ..variants.spec import ARCHITECTURE as VARIANT_ARCHITECTURE
from ..variants.spec import VariantSpec, llama_target
from .checkpoint import Checkpoint

ARCHITECTURES: dict[str, type["Architecture"]] = {}


def register_arch(*names: str) -> Callable[[type["Architecture"]], type["Architecture"]]:
    def deco(cls: type["Architecture"]) -> type["Architecture"]:
        for n in names:
            ARCHITECTURES[n] = cls
        return cls

    return deco


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: where it comes from and the numpy shape it is written with.

    `shape` is (rows, row_length); ggml's ne0 is the last entry. `role` lets type recipes
    tell embeddings, linear layers, norms and biases apart.
    """

    gguf_name: str
    src_name: str
    shape: tuple[int, ...]
    transpose: bool
    role: str  # token_embd | position_embd | output | linear | norm | bias


class Architecture:
    gguf_arch: str  # the llama.cpp architecture written (a class constant, or chosen per checkpoint)

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.warnings: list[str] = []

    def tensor_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def write_hparams(self, writer: GGUFWriter) -> None:
        raise NotImplementedError

    def load(self, spec: TensorSpec) -> np.ndarray:
        """The tensor `spec` is written from, in the checkpoint's layout (before `spec.transpose`);
        an architecture whose GGUF tensors are derived from several checkpoint tensors overrides it."""
        return self.ckpt.load(spec.src_name)


def arch_for(ckpt: Checkpoint) -> Architecture:
    cfg = ckpt.config
    declared = cfg.get("architectures") or []
    if not isinstance(declared, list):
        declared = [declared]
    for name in declared:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name](ckpt)
    if not declared and cfg.get("model_type") in ARCHITECTURES:
        return ARCHITECTURES[cfg["model_type"]](ckpt)
    got = ", ".join(map(str, declared)) or f"model_type={cfg.get('model_type')!r}"
    raise UnsupportedArchitecture(
        f"{ckpt.path / 'config.json'}: architecture {got} is not supported; "
        f"supported: {', '.join(sorted(k for k in ARCHITECTURES if k[0].isupper() and k != VARIANT_ARCHITECTURE))} "
        "(the GPT-2 family: gpt2, gpt2-medium/large/xl, distilgpt2, DialoGPT, or one trained with gpt2cube), "
        f"and {VARIANT_ARCHITECTURE} (gpt2cube train --pos ...)"
    )


def _int_field(ckpt: Checkpoint, *keys: str) -> int:
    for key in keys:
        value = ckpt.config.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CorruptCheckpoint(
                    f"{ckpt.path / 'config.json'}: {key} = {value!r}; expected a positive integer"
                )
            return value
    raise CorruptCheckpoint(f"{ckpt.path / 'config.json'}: missing {' or '.join(keys)}")


# Activations llama.cpp's GPT-2 graph computes exactly (it uses GELU with the tanh approximation).
_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


@register_arch("GPT2LMHeadModel", "GPT2Model", "gpt2")
class GPT2(Architecture):
    gguf_arch = "gpt2"

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__(ckpt)
        cfg = ckpt.config
        self.n_layer = _int_field(ckpt, "n_layer", "num_hidden_layers")
        self.n_embd = _int_field(ckpt, "n_embd", "hidden_size")
        self.n_head = _int_field(ckpt, "n_head", "num_attention_heads")
        self.n_vocab = _int_field(ckpt, "vocab_size")
        # transformers 5 saves only n_positions; llama.cpp's own converter crashes on that.
        self.n_ctx = _int_field(ckpt, "n_positions", "n_ctx")
        self.n_ff = cfg.get("n_inner") or 4 * self.n_embd
        self.eps = float(cfg.get("layer_norm_epsilon", 1e-5))
        self.tied = bool(cfg.get("tie_word_embeddings", True))
        self._check_config()
        self.prefix = self._find_prefix()

    def _check_config(self) -> None:
        cfg, where = self.ckpt.config, self.ckpt.path / "config.json"
        if self.n_embd % self.n_head:
            raise CorruptCheckpoint(f"{where}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        act = cfg.get("activation_function", "gelu_new")
        if act == "gelu":
            self.warnings.append(
                f"{where}: activation_function 'gelu' (erf); llama.cpp computes the tanh approximation, "
                "so logits will differ slightly (about 1e-3)"
            )
        elif act not in _TANH_GELUS:
            raise UnsupportedArchitecture(
                f"{where}: activation_function {act!r} is not supported; llama.cpp's GPT-2 uses "
                f"GELU ({', '.join(sorted(_TANH_GELUS))})"
            )
        for key, ok, why in (
            ("add_cross_attention", False, "cross-attention layers have no place in llama.cpp's GPT-2 graph"),
            ("scale_attn_by_inverse_layer_idx", False, "llama.cpp scales attention by 1/sqrt(head_dim) only"),
            ("scale_attn_weights", True, "llama.cpp always scales attention by 1/sqrt(head_dim)"),
        ):
            if bool(cfg.get(key, ok)) != ok:
                raise UnsupportedArchitecture(f"{where}: {key} = {cfg.get(key)!r} is not supported ({why})")

    def _find_prefix(self) -> str:
        names = set(self.ckpt.names())
        for prefix in ("transformer.", ""):
            if f"{prefix}wte.weight" in names:
                return prefix
        raise CorruptCheckpoint(
            f"{self.ckpt.path}: no token embedding tensor 'transformer.wte.weight' (or 'wte.weight') "
            "in the weights; this does not look like a GPT-2 checkpoint"
        )

    def tensor_specs(self) -> list[TensorSpec]:
        specs = self.specs_for(self.n_layer, self.n_embd, self.n_ff, self.n_vocab, self.n_ctx, self.tied, self.prefix)
        self._check_shapes(specs, set(self.ckpt.names()))
        return specs

    @staticmethod
    def specs_for(n_layer: int, n_embd: int, n_ff: int, n_vocab: int, n_ctx: int, tied: bool,
                  prefix: str = "transformer.") -> list[TensorSpec]:
        """The GGUF tensors of a GPT-2 of this shape and where they come from."""
        p, E, F, V = prefix, n_embd, n_ff, n_vocab
        specs = [
            TensorSpec("token_embd.weight", f"{p}wte.weight", (V, E), False, "token_embd"),
            TensorSpec("position_embd.weight", f"{p}wpe.weight", (n_ctx, E), False, "position_embd"),
        ]
        for i in range(n_layer):
            h, b = f"{p}h.{i}.", f"blk.{i}."
            # HF Conv1D stores (in, out); ggml wants rows of length `in` (ne0 = in): transpose.
            specs += [
                TensorSpec(f"{b}attn_norm.weight", f"{h}ln_1.weight", (E,), False, "norm"),
                TensorSpec(f"{b}attn_norm.bias", f"{h}ln_1.bias", (E,), False, "norm"),
                TensorSpec(f"{b}attn_qkv.weight", f"{h}attn.c_attn.weight", (3 * E, E), True, "linear"),
                TensorSpec(f"{b}attn_qkv.bias", f"{h}attn.c_attn.bias", (3 * E,), False, "bias"),
                TensorSpec(f"{b}attn_output.weight", f"{h}attn.c_proj.weight", (E, E), True, "linear"),
                TensorSpec(f"{b}attn_output.bias", f"{h}attn.c_proj.bias", (E,), False, "bias"),
                TensorSpec(f"{b}ffn_norm.weight", f"{h}ln_2.weight", (E,), False, "norm"),
                TensorSpec(f"{b}ffn_norm.bias", f"{h}ln_2.bias", (E,), False, "norm"),
                TensorSpec(f"{b}ffn_up.weight", f"{h}mlp.c_fc.weight", (F, E), True, "linear"),
                TensorSpec(f"{b}ffn_up.bias", f"{h}mlp.c_fc.bias", (F,), False, "bias"),
                TensorSpec(f"{b}ffn_down.weight", f"{h}mlp.c_proj.weight", (E, F), True, "linear"),
                TensorSpec(f"{b}ffn_down.bias", f"{h}mlp.c_proj.bias", (E,), False, "bias"),
            ]
        specs += [
            TensorSpec("output_norm.weight", f"{p}ln_f.weight", (E,), False, "norm"),
            TensorSpec("output_norm.bias", f"{p}ln_f.bias", (E,), False, "norm"),
        ]
        if not tied:
            # llama.cpp ties output to token_embd when output.weight is absent.
            specs.append(TensorSpec("output.weight", "lm_head.weight", (V, E), False, "output"))
        return specs

    def _check_shapes(self, specs: list[TensorSpec], names: set[str]) -> None:
        for s in specs:
            if s.src_name not in names:
                raise CorruptCheckpoint(
                    f"{self.ckpt.path}: tensor {s.src_name!r} is missing from the weights "
                    f"(needed for {s.gguf_name}; config: n_layer={self.n_layer}, tie_word_embeddings={self.tied})"
                )
            got = self.ckpt.shape(s.src_name)
            want = s.shape[::-1] if s.transpose else s.shape
            if got != want:
                raise ShapeMismatch(
                    f"{self.ckpt.path}: tensor {s.src_name!r} has shape {list(got)} but config.json "
                    f"(n_embd={self.n_embd}, n_inner={self.n_ff}, n_positions={self.n_ctx}, "
                    f"vocab_size={self.n_vocab}) implies {list(want)}"
                )
        used = {s.src_name for s in specs}
        extra = sorted(n for n in names - used if not self._ignorable(n) and not (n == "lm_head.weight" and self.tied))
        if extra:
            self.warnings.append(f"{self.ckpt.path}: ignoring {len(extra)} unexpected tensor(s): {', '.join(extra[:8])}")

    def _ignorable(self, name: str) -> bool:
        """A checkpoint tensor that is no GGUF tensor by design (not worth a warning)."""
        return name.endswith((".attn.bias", ".attn.masked_bias"))  # causal-mask buffers, not weights

    def write_hparams(self, writer: GGUFWriter) -> None:
        writer.add_context_length(self.n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_block_count(self.n_layer)
        writer.add_head_count(self.n_head)
        writer.add_layer_norm_eps(self.eps)


@register_arch(VARIANT_ARCHITECTURE)
class GPT2Variant(GPT2):
    """A gpt2cube variant checkpoint (GPT-2 tensor names; gpt2cube/variants/spec.py), written to
    the llama.cpp graph that computes it exactly, or refused with the reason."""

    def __init__(self, ckpt: Checkpoint) -> None:
        where = ckpt.path / "config.json"
        try:
            self.spec = VariantSpec.from_json(ckpt.config.get("variant"), str(where))
        except InputError as e:
            raise UnsupportedArchitecture(str(e)) from None
        target, why = llama_target(self.spec)
        if target is None:
            raise UnsupportedArchitecture(f"{where}: variant {self.spec.describe()} cannot be converted: {why}; "
                                          "evaluate it in PyTorch (eval perplexity --hf)")
        self.gguf_arch = target
        super().__init__(ckpt)
        if self.spec.pos == "rope":  # the only rotary scheme llama_target lets through
            self.n_rot = self.spec.rotary_dims(self.n_embd // self.n_head)
        self._check_drift_tensors()

    def _check_drift_tensors(self) -> None:
        """The tensors `load` folds into attn_output: present, n_head x head size, before anything is written."""
        want, names = (self.n_head, self.n_embd // self.n_head), set(self.ckpt.names())
        for part in {"drift", "baseline"} & set(self.spec.dd_parts):
            for layer in range(self.n_layer):
                name = f"{self.prefix}h.{layer}.attn.dd_{part}"
                if name not in names:
                    raise CorruptCheckpoint(f"{self.ckpt.path}: tensor {name!r} is missing "
                                            f"(variant {self.spec.describe()})")
                if tuple(self.ckpt.shape(name)) != want:
                    raise ShapeMismatch(f"{self.ckpt.path}: tensor {name!r} has shape {list(self.ckpt.shape(name))}; "
                                        f"expected {list(want)} (n_head x head size)")

    def _ignorable(self, name: str) -> bool:
        # drift-diffusion: the drift (and baseline) fold into attn_output (load); the diffusion is training-only
        return super()._ignorable(name) or ".attn.dd_" in name

    def load(self, spec: TensorSpec) -> np.ndarray:
        """Drift-diffusion folded into attn_output: the head outputs a' = (1 + g) a - g beta with
        g = sigmoid(d) per (head, dim), so c_proj (HF Conv1D, y = a' W + b) becomes
        W' = diag(1 + g) W and b' = b - (g beta) W; exact, in float64."""
        data = super().load(spec)
        if "drift" not in self.spec.dd_parts or not spec.src_name.endswith((".attn.c_proj.weight", ".attn.c_proj.bias")):
            return data
        attn = spec.src_name.rsplit(".c_proj.", 1)[0]
        g = 1.0 / (1.0 + np.exp(-self._dd(f"{attn}.dd_drift")))  # [E] in head-major order, as the heads concatenate
        if spec.src_name.endswith(".weight"):
            return ((1.0 + g)[:, None] * data.astype(np.float64)).astype(np.float32)
        if "baseline" not in self.spec.dd_parts:
            return data
        w = self.ckpt.load(f"{attn}.c_proj.weight").astype(np.float64)
        return (data.astype(np.float64) - (g * self._dd(f"{attn}.dd_baseline")) @ w).astype(np.float32)

    def _dd(self, name: str) -> np.ndarray:
        return self.ckpt.load(name).astype(np.float64).reshape(-1)  # checked in _check_drift_tensors

    def tensor_specs(self) -> list[TensorSpec]:
        if self.gguf_arch == "gpt2":
            return super().tensor_specs()
        specs = [s for s in self.specs_for(self.n_layer, self.n_embd, self.n_ff, self.n_vocab, self.n_ctx, True,
                                           self.prefix) if s.role != "position_embd"]
        if self.spec.parallel_residual:  # one LayerNorm feeds attention and MLP: llama.cpp's ffn_norm is a copy of it
            specs = [TensorSpec(s.gguf_name, s.src_name.replace(".ln_2.", ".ln_1."), s.shape, s.transpose, s.role)
                     for s in specs]
        if self.gguf_arch == "gptneox" or not self.tied:  # gptneox requires output.weight; mpt ties when absent
            head = f"{self.prefix}wte.weight" if self.tied else "lm_head.weight"
            specs.append(TensorSpec("output.weight", head, (self.n_vocab, self.n_embd), False, "output"))
        self._check_shapes(specs, set(self.ckpt.names()))
        return specs

    def write_hparams(self, writer: GGUFWriter) -> None:
        super().write_hparams(writer)
        if self.gguf_arch == "gptneox":
            writer.add_rope_dimension_count(self.n_rot)
            writer.add_rope_freq_base(self.spec.rope_base)
            writer.add_parallel_residual(self.spec.parallel_residual)
        elif self.gguf_arch == "mpt" and self.spec.pos == "alibi":
            writer.add_max_alibi_bias(self.spec.alibi_max_bias)
