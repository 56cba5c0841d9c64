"""`gpt2cube imatrix`: the statistic llama-imatrix collects, from a forward pass in PyTorch.

For every linear weight of the transformer blocks (llama.cpp's `blk.*` matrices: attn_qkv,
attn_output, ffn_up, ffn_down; token_embd and the tied output head are left out, as llama-imatrix
leaves them out by default), the sum over calibration tokens of each input column's squared
activation, and the number of tokens. The text is cut into windows of `ctx` tokens (llama-imatrix's
chunks of n_ctx, default 512) and every token of every window counts, as in llama-imatrix. No BOS
is inserted: GPT-2's vocabulary does not ask llama.cpp to add one.

Sources: an HF checkpoint directory (the model as trained) or a GGUF file (the activations of the
weights as the file stores them, dequantized).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .imatrix_file import Imatrix


def linear_modules(model, specs) -> dict[str, object]:
    """GGUF name -> the torch module whose input feeds that linear weight."""
    modules = dict(model.named_modules())
    out = {}
    for s in specs:
        if s.role != "linear":
            continue
        path = s.src_name.rsplit(".", 1)[0]
        for cand in (path, f"transformer.{path}", path.removeprefix("transformer.")):
            if cand in modules:
                out[s.gguf_name] = modules[cand]
                break
        else:
            raise InputError(f"tensor {s.src_name}: no module {path} in the model; cannot collect its inputs")
    return out


def collect(model, specs, tokens: np.ndarray, ctx: int, dataset: str, batch: int = 4) -> Imatrix:
    """Sums of squared inputs per column of each linear weight over `tokens` in windows of `ctx`."""
    import torch

    mods = linear_modules(model, specs)
    cols = {s.gguf_name: s.shape[-1] for s in specs if s.gguf_name in mods}
    sums = {n: torch.zeros(c, dtype=torch.float64) for n, c in cols.items()}
    counts = dict.fromkeys(cols, 0)
    hooks = []

    def hook_for(name):
        def pre(_mod, args):
            x = args[0].detach()
            if x.shape[-1] != cols[name]:
                raise InputError(f"tensor {name}: its module sees inputs of width {x.shape[-1]}; the weight has "
                                 f"{cols[name]} input columns")
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]

        return pre

    for name, m in mods.items():
        hooks.append(m.register_forward_pre_hook(hook_for(name)))
    wins = [tokens[i : i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]
    if not wins:
        raise InputError(f"{dataset}: {len(tokens)} calibration tokens; expected at least one window of --ctx {ctx}")
    try:
        with torch.no_grad():
            for i in range(0, len(wins), batch):
                model(torch.from_numpy(np.stack(wins[i : i + batch]).astype(np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return Imatrix({n: s.numpy() for n, s in sums.items()}, counts, [dataset], len(wins), ctx)


def imatrix_of(src: Path, calib: Path, n_tokens: int, ctx: int | None = None) -> tuple[Imatrix, dict]:
    """(importance matrix, summary) of an HF checkpoint directory or a GGUF file on `calib`."""
    from ..converter.arch import GPT2, arch_for
    from ..converter.checkpoint import open_checkpoint
    from ..hypercube.calibrate import calibration_tokens
    from ..models import load_hf_model, model_from_gguf

    if src.is_file():
        model = model_from_gguf(src)
        cfg = model.config
        n_ctx = cfg.n_positions
        specs = GPT2.specs_for(cfg.n_layer, cfg.n_embd, cfg.n_inner, cfg.vocab_size, cfg.n_positions,
                               cfg.tie_word_embeddings)
        n_vocab = cfg.vocab_size
    else:
        arch = arch_for(open_checkpoint(src))
        specs, n_vocab, n_ctx = arch.tensor_specs(), arch.n_vocab, arch.n_ctx
        model = load_hf_model(src)
    ctx = min(512, n_ctx) if ctx is None else ctx
    if not 16 <= ctx <= n_ctx:
        raise InputError(f"--ctx {ctx}; expected 16 .. {n_ctx} (the model's context)")
    if n_tokens < ctx:
        raise InputError(f"--calib-tokens {n_tokens}; expected at least one window of --ctx {ctx}")
    tokens, sha = calibration_tokens(calib, n_tokens, n_vocab)
    im = collect(model, specs, tokens, ctx, str(calib))
    summary = {"source": str(src), "calib": str(calib), "calib_sha256": sha, "tokens": im.chunk_count * ctx,
               "chunks": im.chunk_count, "chunk_size": ctx, "entries": len(im.sums)}
    if len(tokens) < n_tokens:  # the text ran out: say so, the statistic is of what there was
        summary["warning"] = (f"{calib} has {len(tokens)} tokens, fewer than the {n_tokens} asked; the importance "
                              f"matrix is of its {im.chunk_count} whole windows of {ctx}")
    return im, summary
