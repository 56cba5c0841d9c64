"""The GPT-2 variant family in torch: GPT-2's blocks and parameter names (HF Conv1D layout, so the
converter maps them with GPT-2's own tensor table), with the position scheme and block wiring of
a `VariantSpec` (causal Linformer attention in linformer.py; alternate-direction's direction
embedding `transformer.wde` and its reversed training windows in `training_inputs`; residual
diffusion's training noise after each block; the seed's variants: drift-diffusion's per-head
`attn.dd_drift` / `attn.dd_baseline` / `attn.dd_diffusion` before c_proj, parallel paths' stages
and shared `transformer.bottleneck`, duo-predict's interleaved <|MASK|> sequences (duo.py)). Checkpoints are Hugging Face-style directories: config.json (architectures
["GPT2CubeVariantLM"], GPT-2's shape keys plus "variant"), model.safetensors, tokenizer files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import CorruptCheckpoint, InputError
from .duo import duo_mask, duo_positions, duo_training_pair
from .linformer import CausalLinformer
from .lm_io import SafetensorsLM
from .positions import POSITION_MODULES, sinusoid_table
from .spec import ARCHITECTURE, DUO_MASK_TOKEN, MODEL_TYPE, POSITIONS, VariantSpec


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
        parts, hd = spec.dd_parts, (cfg.n_head, self.head_dim)  # the seed's initialisation
        if "drift" in parts:
            self.dd_drift = nn.Parameter(torch.randn(*hd))
        if "baseline" in parts:
            self.dd_baseline = nn.Parameter(torch.randn(*hd) * 1e-3)
        if "diffusion" in parts:
            self.dd_diffusion = nn.Parameter(torch.randn(*hd))

    def forward(self, x, pos=None, mask=None):
        """pos: [T] position of each token (default 0..T-1); mask: [T, T] bool, True where a query
        may attend (default causal)."""
        B, T, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.pos.rotate(q, k, torch.arange(T, device=x.device) if pos is None else pos)
        bias = self.pos.bias(T, x.device)
        if hasattr(self, "linformer"):
            y = self.linformer(q, k, v)
        elif bias is None:
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = bias.to(q.dtype).masked_fill(~causal, float("-inf"))
            y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
        y = self.drift_diffusion(y.transpose(1, 2))  # [B, T, H, D]
        return self.c_proj(y.reshape(B, T, E))

    def drift_diffusion(self, a):
        """The seed's drift-diffusion on each head's output [B, T, H, D]: a + sigmoid(d) (a - beta)
        (beta 0 without the baseline), then + s * N(0, 1) noise in training only."""
        if hasattr(self, "dd_drift"):
            drift = torch.sigmoid(self.dd_drift)
            a = a + drift * (a - self.dd_baseline if hasattr(self, "dd_baseline") else a)
        if hasattr(self, "dd_diffusion") and self.training:
            a = a + self.dd_diffusion * torch.randn_like(a)
        return a


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
        self.parallel = cfg.variant.parallel_residual
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        if not self.parallel:  # parallel residual blocks read one LayerNorm (GPT-J / PaLM)
            self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, pos=None, mask=None):
        if self.parallel:
            h = self.ln_1(x)
            return x + self.attn(h, pos, mask) + self.mlp(h)
        x = x + self.attn(self.ln_1(x), pos, mask)
        return x + self.mlp(self.ln_2(x))


class VariantLM(SafetensorsLM, nn.Module):
    """Returns an object with `.logits`, as transformers' models do, so the trainer and the
    evaluations take it in place of GPT2LMHeadModel."""

    config_class = VariantConfig

    def __init__(self, config: VariantConfig) -> None:
        super().__init__()
        self.config = config
        spec, E = config.variant, config.n_embd
        if E % config.n_head:
            raise InputError(f"n_embd {E} is not divisible by n_head {config.n_head}")
        if POSITIONS[spec.pos].rotary:
            spec.rotary_dims(E // config.n_head)  # raises on a fraction that rotates nothing
        if spec.pos == "rotating" and (E // config.n_head) % 2:
            raise InputError(f"--pos rotating rotates pairs of dimensions; head size {E // config.n_head} "
                             f"(n_embd {E} / n_head {config.n_head}) is odd")
        if spec.attention == "linformer" and spec.linformer_block >= config.n_positions:
            raise InputError(f"--linformer-block {spec.linformer_block} is not below the context "
                             f"{config.n_positions}: no earlier block would ever be compressed")
        if spec.duo_predict and config.n_positions < 2:
            raise InputError(f"--duo-predict needs a context of at least 2 tokens (a mask sits between two real "
                             f"ones); got {config.n_positions}")
        if spec.parallel_paths and config.n_layer % 2:
            raise InputError(f"--parallel {spec.parallel_paths}: n_layer {config.n_layer} is odd; parallel paths "
                             "run blocks in pairs (stage k: blocks 2k and 2k+1), so n_layer must be even")
        t = nn.Module()
        t.wte = nn.Embedding(config.vocab_size, E)
        table = POSITIONS[spec.pos].table
        if table == "learned":
            t.wpe = nn.Embedding(config.n_positions, E)
        elif table == "fixed":
            # amplitude = the embeddings' init std: table : embedding RMS per dimension is 1 : sqrt 2, as in
            # Vaswani et al. (unit table, embeddings of std d^-1/2 scaled by sqrt d). A unit table on GPT-2's
            # 0.02-std embeddings swamps them (3.2x the PPL of learned positions in the matched run).
            # Checkpoints store their table, so files made with another amplitude load as they were.
            t.wpe = FixedTable(sinusoid_table(config.n_positions, E, config.initializer_range))
        if spec.alternate_direction:  # row 0: reading left to right (inference), row 1: right to left
            t.wde = nn.Embedding(2, E)
        t.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        if spec.parallel_paths == "concat":  # one Linear shared by every stage, as the seed has it
            t.bottleneck = nn.Linear(2 * E, E)
        t.ln_f = nn.LayerNorm(E, eps=config.layer_norm_epsilon)
        self.transformer = t
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        self._init(config)

    def _init(self, cfg: VariantConfig) -> None:
        std = cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2 and not any(k in name for k in ("pos.", "linformer.", ".dd_")):  # those start as built
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else std)
        if hasattr(self.transformer, "bottleneck"):
            nn.init.zeros_(self.transformer.bottleneck.bias)

    def describe(self) -> str:
        return f"variant {self.config.variant.describe()}"

    @property
    def extrapolates(self) -> bool:
        """Runs on more tokens than it was trained on (no absolute position table)."""
        return not POSITIONS[self.config.variant.pos].absolute

    @property
    def mask_token_id(self) -> int:
        """Duo-predict's <|MASK|>: the last id of the vocabulary."""
        return self.config.vocab_size - 1

    def added_tokens(self) -> dict[str, int]:
        """Tokens beyond GPT-2's BPE vocabulary (saved as added_tokens.json beside vocab.json)."""
        return {DUO_MASK_TOKEN: self.mask_token_id} if self.config.variant.duo_predict else {}

    def save_pretrained(self, out: Path) -> None:
        """The weights and config, and added_tokens.json (transformers' file for tokens beyond
        vocab.json, which convert reads too) where the variant adds tokens."""
        super().save_pretrained(out)
        if self.added_tokens():
            (Path(out) / "added_tokens.json").write_text(json.dumps(self.added_tokens()) + "\n")

    def training_inputs(self, xy: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The trainer's windows [B, T+1] as this variant trains on them: (inputs, targets with -100
        where nothing is scored, forward's extra arguments).
        Alternate-direction: sequence i of step s reads right to left when i + s is odd (the window
        reversed, so next-token targets become previous tokens), so directions alternate within a
        batch and, for a batch of one, from step to step. Duo-predict: duo.duo_training_pair."""
        spec = self.config.variant
        if spec.duo_predict:
            inputs, targets = duo_training_pair(xy, self.mask_token_id, spec.duo_loss)
            return inputs, targets, {"duo": True}
        if spec.alternate_direction:
            back = (torch.arange(xy.shape[0], device=xy.device) + step) % 2 == 1
            xy = torch.where(back[:, None], xy.flip(1), xy)
            return xy[:, :-1], xy[:, 1:], {"reverse": back}
        return xy[:, :-1], xy[:, 1:], {}

    def forward(self, input_ids, labels=None, reverse=None, duo: bool = False):
        """duo: input_ids are duo-predict's interleaved sequences (duo.py), 2T-1 tokens for T real ones."""
        t = self.transformer
        N = input_ids.shape[1]
        pos = mask = None
        if duo:
            if not self.config.variant.duo_predict or N % 2 == 0:
                raise InputError(f"duo=True takes a duo-predict model and an odd-length interleaved sequence "
                                 f"(got {self.config.variant.describe()}, {N} tokens)")
            T = (N + 1) // 2
            pos, mask = duo_positions(T, input_ids.device), duo_mask(T, input_ids.device)
        else:
            T = N
        if T > self.config.n_positions and not self.extrapolates:
            raise InputError(f"{T} tokens exceed the model's {self.config.n_positions} positions (--pos "
                             f"{self.config.variant.pos} has a position table of that length)")
        x = t.wte(input_ids)
        if hasattr(t, "wpe"):
            x = x + t.wpe(torch.arange(N, device=input_ids.device) if pos is None else pos)
        if hasattr(t, "wde"):
            rows = torch.zeros(input_ids.shape[0], dtype=torch.long, device=x.device) if reverse is None \
                else reverse.long()
            x = x + t.wde(rows)[:, None, :]
        sigma, paths = self.config.variant.residual_diffusion, self.config.variant.parallel_paths
        stages = [(b,) for b in t.h] if not paths else [(t.h[i], t.h[i + 1]) for i in range(0, len(t.h), 2)]
        for stage in stages:
            if len(stage) == 1:
                x = stage[0](x, pos, mask)
            else:  # the seed's parallel paths: both blocks on the same input, merged
                left, right = stage[0](x, pos, mask), stage[1](x, pos, mask)
                x = (t.bottleneck(torch.cat([left, right], -1)) if paths == "concat" else
                     left + right if paths == "add" else (left + right) / 2)
            if sigma and self.training:  # diffusion over unit depth-time: each of L steps adds variance sigma^2/L
                rms = x.detach().pow(2).mean(-1, keepdim=True).sqrt()
                x = x + (sigma / math.sqrt(len(stages))) * rms * torch.randn_like(x)
        x = t.ln_f(x)
        head = t.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return SimpleNamespace(logits=x @ head.T)
