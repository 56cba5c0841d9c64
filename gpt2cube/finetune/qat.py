"""Quantization-aware training: the forward and backward passes run on the converter's values.

`QuantizedWeights` knows, for every weight matrix of a transformers GPT-2, the encoding that
`convert` would give it (the same `Recipe`: --type, --embed-type, --recipe, --ternary-scale,
the same row-length fallbacks and --strict). Inside `with qw.active(lam):` each such parameter
holds  w_eff = w + lam * (Q(w) - w)  (lam = 1: exactly the stored values); after the backward
pass the latent full-precision weights are put back, so the gradient computed at w_eff updates
w: the straight-through estimator (dQ/dw taken as the identity), as BitNet and BinaryConnect
train. lam ramps from 0 to 1 over the QAT warm-up (Hugging Face's 1.58-bit fine-tune of Llama 3);
a warm-up of 0 steps is the abrupt switch.

Weights that do not train (frozen embeddings) are quantized once and cached. Tied embeddings
are one parameter, so token_embd and the output head get the same values, as in the file.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ..converter.arch import GPT2, TensorSpec
from ..converter.plan import Recipe, plan_types
from .fakequant import fake_quant


@dataclass
class QuantizedParam:
    name: str          # parameter name in the transformers model
    spec: TensorSpec   # the GGUF tensor it becomes
    qtype: str         # the encoding planned for it (after fallbacks)
    param: object      # torch.nn.Parameter


def model_specs(config) -> list[TensorSpec]:
    """The converter's tensor list for a transformers GPT2Config."""
    n_ff = config.n_inner or 4 * config.n_embd
    return GPT2.specs_for(config.n_layer, config.n_embd, n_ff, config.vocab_size, config.n_positions,
                          bool(getattr(config, "tie_word_embeddings", True)))


def param_name(spec: TensorSpec) -> str:
    return spec.src_name if spec.src_name.startswith(("transformer.", "lm_head.")) else f"transformer.{spec.src_name}"


class QuantizedWeights:
    def __init__(self, model, recipe: Recipe) -> None:
        planned, self.warnings = plan_types(model_specs(model.config), recipe)
        self.recipe = recipe
        params = dict(model.named_parameters())
        self.params = [QuantizedParam(param_name(p.spec), p.spec, p.qtype.name, params[param_name(p.spec)])
                       for p in planned if p.qtype.name != "f32"]
        self._frozen_cache: dict[str, object] = {}

    def types(self) -> dict[str, str]:
        """GGUF tensor name -> encoding, for the log and the checkpoint's record."""
        return {q.spec.gguf_name: q.qtype for q in self.params}

    def quantized(self, q: QuantizedParam):
        """Q(w) in the parameter's own (HF) layout."""
        w = q.param.detach()
        g = w.t() if q.spec.transpose else w
        out = fake_quant(q.qtype, g.float(), self.recipe.ternary_scale)
        return (out.t() if q.spec.transpose else out).contiguous()

    def _effective(self, q: QuantizedParam, lam: float):
        if not q.param.requires_grad:
            key = q.name
            if key not in self._frozen_cache:
                self._frozen_cache[key] = self.quantized(q)
            target = self._frozen_cache[key]
        else:
            target = self.quantized(q)
        if lam >= 1.0:
            return target
        w = q.param.detach()
        return w + lam * (target.to(w.dtype) - w)

    @contextmanager
    def active(self, lam: float = 1.0):
        """Parameters hold w_eff inside; their latent values come back on exit (even on error)."""
        import torch

        latent = []
        with torch.no_grad():
            for q in self.params:
                latent.append(q.param.data.clone())
                q.param.data.copy_(self._effective(q, lam))
        try:
            yield
        finally:
            with torch.no_grad():
                for q, w in zip(self.params, latent):
                    q.param.data.copy_(w)

    def state(self) -> dict[str, object]:
        """HF parameter name -> the quantized values (lam = 1), what the converted file holds."""
        import torch

        with torch.no_grad():
            return {q.name: self._effective(q, 1.0).clone() for q in self.params}
