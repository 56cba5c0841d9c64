"""The GPT-2 variant family in torch: GPT-2's blocks and parameter names (HF Conv1D layout, so the
converter maps them with GPT-2's own tensor table), with the position scheme and block wiring of
a `VariantSpec` (causal Linformer attention in linformer.py; duo-predict's direction embedding
`transformer.wde` and its reversed training windows in `training_inputs`; drift-diffusion's
training noise after each block). Checkpoints are Hugging Face-style directories: config.json (architectures
["GPT2CubeVariantLM"], GPT-2's shape keys plus "variant"), model.safetensors, tokenizer files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import CorruptCheckpoint, InputError
from .linformer import CausalLinformer
from .lm_io import SafetensorsLM
from .positions import POSITION_MODULES, sinusoid_table
from .spec import ARCHITECTURE, MODEL_TYPE, POSITIONS, VariantSpec


@dataclass
class VariantConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int = 50257
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    variant: VariantSpec = field(default_factory=VariantSpec)

    def to_json(self) -> dict:
        keys = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner", "layer_norm_epsilon",
                "tie_word_embeddings", "initializer_range")
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "activation_function": "gelu_new",
                **{k: getattr(self, k) for k in keys}, "bos_token_id": 50256, "eos_token_id": 50256,
                "variant": self.variant.to_json()}

    @classmethod
    def from_json(cls, cfg: dict, where: str) -> "VariantConfig":
        spec = VariantSpec.from_json(cfg.get("variant"), where)
        try:
            return cls(**{k: cfg[k] for k in ("n_layer", "n_embd", "n_head", "n_positions")},
                       **{k: cfg[k] for k in ("vocab_size", "n_inner", "layer_norm_epsilon", "tie_word_embeddings",
                                              "initializer_range") if k in cfg}, variant=spec)
        except KeyError as e:
            raise CorruptCheckpoint(f"{where}: missing {e.args[0]}") from None


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class FixedTable(nn.Module):
    """A position table that is stored (as transformer.wpe.weight) but never trained."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table)

    def forward(self, pos):
        return self.weight[pos]


class Attention(nn.Module):
    def __init__(self, cfg: VariantConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.pos = POSITION_MODULES[cfg.variant.pos](cfg.variant, cfg.n_head, self.head_dim)
        spec = cfg.variant
        if spec.attention == "linformer":  # the spec refuses distance-bias positions with it
            self.linformer = CausalLinformer(spec.linformer_block, spec.linformer_k)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.pos.rotate(q, k, torch.arange(T, device=x.device))
        bias = self.pos.bias(T, x.device)
        if hasattr(self, "linformer"):
            y = self.linformer(q, k, v)
        elif bias is None:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = bias.to(q.dtype).masked_fill(~causal, float("-inf"))
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
        return self.c_proj(y.transpose(1, 2).reshape(B, T, E))


class MLP(nn.Module):
    def __init__(self, cfg: VariantConfig) -> None:
        super().__init__()
        n_ff = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc, self.c_proj = Conv1D(cfg.n_embd, n_ff), Conv1D(n_ff, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: VariantConfig) -> None:
        super().__init__()
        self.parallel = cfg.variant.parallel
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        if not self.parallel:  # parallel blocks read one LayerNorm (GPT-J / PaLM)
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x):
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h) + self.mlp(h)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VariantLM(SafetensorsLM, nn.Module):
    """Returns an object with `.logits`, as transformers' models do, so the trainer and the
    evaluations take it in place of GPT2LMHeadModel."""

    config_class = VariantConfig

    def __init__(self, config: VariantConfig) -> None:
        super().__init__()
        self.config = config
        E = config.n_embd
        if E % config.n_head:
            raise InputError(f"n_embd {E} is not divisible by n_head {config.n_head}")
        if POSITIONS[config.variant.pos].rotary:
            config.variant.rotary_dims(E // config.n_head)  # raises on a fraction that rotates nothing
        if config.variant.attention == "linformer" and config.variant.linformer_block >= config.n_positions:
            raise InputError(f"--linformer-block {config.variant.linformer_block} is not below the context "
                             f"{config.n_positions}: no earlier block would ever be compressed")
        t = nn.Module()
        t.wte = nn.Embedding(config.vocab_size, E)
        if config.variant.pos == "learned":
            t.wpe = nn.Embedding(config.n_positions, E)
        elif config.variant.pos == "sinusoidal":
            # amplitude = the embeddings' init std: table : embedding RMS per dimension is 1 : sqrt 2, as in
            # Vaswani et al. (unit table, embeddings of std d^-1/2 scaled by sqrt d). A unit table on GPT-2's
            # 0.02-std embeddings swamps them (3.2x the PPL of learned positions in the matched run).
            # Checkpoints store their table, so files made with another amplitude load as they were.
            t.wpe = FixedTable(sinusoid_table(config.n_positions, E, config.initializer_range))
        if config.variant.duo_predict:  # row 0: reading left to right (inference), row 1: right to left
            t.wde = nn.Embedding(2, E)
        t.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        t.ln_f = nn.LayerNorm(E, eps=config.layer_norm_epsilon)
        self.transformer = t
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        self._init(config)

    def _init(self, cfg: VariantConfig) -> None:
        std = cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "pos." not in name and "linformer." not in name:  # those start as they are built
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else std)

    def describe(self) -> str:
        return f"variant {self.config.variant.describe()}"

    @property
    def extrapolates(self) -> bool:
        """Runs on more tokens than it was trained on (no absolute position table)."""
        return not POSITIONS[self.config.variant.pos].absolute

    def training_inputs(self, xy: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The trainer's windows [B, T+1] as this variant trains on them, with forward's extra
        arguments. Duo-predict: sequence i of step s reads right to left when i + s is odd (the
        window reversed, so next-token targets become previous tokens), so directions alternate
        within a batch and, for a batch of one, from step to step."""
        if not self.config.variant.duo_predict:
            return xy, {}
        back = (torch.arange(xy.shape[0], device=xy.device) + step) % 2 == 1
        return torch.where(back[:, None], xy.flip(1), xy), {"reverse": back}

    def forward(self, input_ids, labels=None, reverse=None):
        t = self.transformer
        T = input_ids.shape[1]
        if T > self.config.n_positions and not self.extrapolates:
            raise InputError(f"{T} tokens exceed the model's {self.config.n_positions} positions (--pos "
                             f"{self.config.variant.pos} has a position table of that length)")
        x = t.wte(input_ids)
        if hasattr(t, "wpe"):
            x = x + t.wpe(torch.arange(T, device=input_ids.device))
        if hasattr(t, "wde"):
            rows = torch.zeros(input_ids.shape[0], dtype=torch.long, device=x.device) if reverse is None \
                else reverse.long()
            x = x + t.wde(rows)[:, None, :]
        sigma = self.config.variant.diffusion_sigma
        for block in t.h:
            x = block(x)
            if sigma and self.training:  # diffusion over unit depth-time: each of L steps adds variance sigma^2/L
                rms = x.detach().pow(2).mean(-1, keepdim=True).sqrt()
                x = x + (sigma / math.sqrt(len(t.h))) * rms * torch.randn_like(x)
        x = t.ln_f(x)
        head = t.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return SimpleNamespace(logits=x @ head.T)


