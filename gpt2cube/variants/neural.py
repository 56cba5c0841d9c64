"""Pre-transformer neural language models on GPT-2's tokens, for the progression table: Bengio et
al.'s feed-forward n-gram network (2003), an Elman RNN and an LSTM. Each returns `.logits` for
every position of a [B, T] batch, so the trainer trains them and the perplexity windows score them
exactly as they score the GPTs (the recurrent ones start each window from a zero state; the
feed-forward one sees the last `order - 1` tokens, the window's start padded with <|endoftext|>).
The output layer is tied to the token embeddings, as GPT-2's is, so parameter counts compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import CorruptCheckpoint, InputError
from .lm_io import SafetensorsLM
from .spec import NEURAL_KINDS, OWN_ARCHITECTURES

ARCHITECTURE = OWN_ARCHITECTURES[1]
EOT = 50256


@dataclass
class NeuralConfig:
    kind: str  # a key of NEURAL_MODELS
    n_embd: int = 256
    n_hidden: int = 512
    n_layer: int = 1  # recurrent layers
    order: int = 5  # ffnn: n of the n-gram (order - 1 tokens of history)
    vocab_size: int = 50257
    n_positions: int = 512  # training window; the models run on any length

    def __post_init__(self) -> None:
        if self.kind not in NEURAL_MODELS:
            raise InputError(f"neural model {self.kind!r} is not known; known: {', '.join(NEURAL_MODELS)}")
        for key in ("n_embd", "n_hidden", "n_layer", "vocab_size", "n_positions"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"{key} = {value!r}; expected a positive integer")
        if not isinstance(self.order, int) or self.order < 2:
            raise InputError(f"order = {self.order!r}; expected an integer of at least 2")

    def to_json(self) -> dict:
        return {"architectures": [ARCHITECTURE], "model_type": "gpt2cube_neural", **asdict(self)}

    @classmethod
    def from_json(cls, cfg: dict, where: str) -> "NeuralConfig":
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        try:
            return cls(**fields)
        except (InputError, TypeError) as e:
            raise CorruptCheckpoint(f"{where}: {e}") from None


class NeuralLM(SafetensorsLM, nn.Module):
    config_class = NeuralConfig
    extrapolates = True

    def __init__(self, config: NeuralConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.body = NEURAL_MODELS[config.kind](config)
        self.proj = nn.Linear(config.n_hidden, config.n_embd)  # to the tied output embedding
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.wte.weight, 0.0, 0.02)

    def describe(self) -> str:
        return f"neural {self.config.kind}"

    def forward(self, input_ids, labels=None):
        h = self.body(self.wte(input_ids), self.wte.weight[EOT])
        return SimpleNamespace(logits=self.proj(h) @ self.wte.weight.T + self.out_bias)


class FeedForwardBody(nn.Module):
    """Bengio et al. 2003: the concatenated embeddings of the last order - 1 tokens, tanh hidden layer."""

    def __init__(self, cfg: NeuralConfig) -> None:
        super().__init__()
        self.history = cfg.order - 1
        self.hidden = nn.Linear(self.history * cfg.n_embd, cfg.n_hidden)

    def forward(self, emb, pad):
        B, T, E = emb.shape
        padded = torch.cat([pad.expand(B, self.history - 1, E), emb], dim=1) if self.history > 1 else emb
        ctx = padded.unfold(1, self.history, 1)  # [B, T, E, history], oldest first
        return torch.tanh(self.hidden(ctx.transpose(2, 3).reshape(B, T, self.history * E)))


class RecurrentBody(nn.Module):
    cell: type

    def __init__(self, cfg: NeuralConfig) -> None:
        super().__init__()
        self.rnn = self.cell(cfg.n_embd, cfg.n_hidden, num_layers=cfg.n_layer, batch_first=True)

    def forward(self, emb, pad):
        return self.rnn(emb)[0]


class ElmanBody(RecurrentBody):
    cell = nn.RNN  # tanh


class LSTMBody(RecurrentBody):
    cell = nn.LSTM


NEURAL_MODELS: dict[str, type[nn.Module]] = dict(zip(NEURAL_KINDS, (FeedForwardBody, ElmanBody, LSTMBody)))
