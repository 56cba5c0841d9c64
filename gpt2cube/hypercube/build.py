"""What `convert --hypercube-dim D --calib TEXT [--concepts FILE]` does before writing: run the
checkpoint in transformers on the calibration text, fit the routers, group the neurons, embed the
concepts; then, while the converter streams tensors, permute each FFN into vertex order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, UnsupportedArchitecture
from ..models import checkpoint_model
from ..tokenizers import encode_text, hf_tokenizer
from .calibrate import ROUTERS, Calibration, LayerRouter, calibrate, calibration_tokens
from .concepts import ConceptMap, build_concept_map, read_concepts
from .metadata import read_routing_file, write_hypercube
from .topology import MAX_DIM, Hypercube


@dataclass
class HypercubeOptions:
    dim: int
    calib: Path | None                # None with `source`
    calib_tokens: int = 8192
    concepts: Path | None = None
    concept_layer: int | None = None  # default: the middle layer
    router: str = "learned"
    router_radius: int | None = None  # default: calibrate.default_radius(dim)
    source: Path | None = None        # --hypercube-from: reuse this file's routers and groups, no calibration

    def prepare(self, ckpt, arch, planned, log: Callable[[str], None]) -> "HypercubeBuild":
        """The converter's extension hook: check against the model and ffn_down's planned
        types, then calibrate."""
        if arch.gguf_arch != "gpt2":
            raise UnsupportedArchitecture(
                f"{ckpt.path}: --hypercube-dim needs a GPT-2 graph (the routed engine is GPT-2 only); this "
                f"checkpoint converts to llama.cpp's {arch.gguf_arch!r} architecture")
        reused = routing_from(self.source, arch) if self.source is not None else None
        if reused is not None:
            self.dim = reused.dim
        check_options(self, arch.n_ff, arch.n_layer,
                      [p.qtype for p in planned if p.spec.gguf_name.endswith(".ffn_down.weight")])
        return build_hypercube(ckpt, arch, self, log, reused)


@dataclass
class HypercubeBuild:
    calibration: Calibration
    concepts: ConceptMap | None

    _FFN = re.compile(r"blk\.(\d+)\.ffn_(up|down)\.(weight|bias)$")

    def permute(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Reorder FFN neurons into vertex groups; other tensors pass through. `data` is in GGUF
        layout: ffn_up (F, E) rows are neurons, ffn_down (E, F) columns are neurons."""
        m = self._FFN.match(gguf_name)
        if not m or (m[2] == "down" and m[3] == "bias"):
            return data
        perm = self.calibration.layers[int(m[1])].perm
        return data[:, perm] if m[2] == "down" else data[perm]

    def permute_model(self, model) -> None:
        """The same reordering applied to a transformers GPT2LMHeadModel in place (Conv1D: c_fc
        weight (E, F) and bias (F,), c_proj weight (F, E)): its function is unchanged, and a method
        that quantizes it afterwards (GPTQ) sees ffn_down's input columns in vertex order, so its
        block scales and error feedback run over the columns the file stores."""
        import torch

        with torch.no_grad():
            for lr, block in zip(self.calibration.layers, model.transformer.h):
                perm = torch.as_tensor(np.asarray(lr.perm, dtype=np.int64))
                fc, proj = block.mlp.c_fc, block.mlp.c_proj
                fc.weight.copy_(fc.weight[:, perm])
                fc.bias.copy_(fc.bias[perm])
                proj.weight.copy_(proj.weight[perm, :])

    def permute_importance(self, gguf_name: str, imp: np.ndarray, n_rows: int) -> np.ndarray:
        """A per-column importance vector of tensor `gguf_name` in the order `permute` gives its columns."""
        full = np.ascontiguousarray(np.broadcast_to(imp, (n_rows, imp.shape[-1])))
        return self.permute(gguf_name, full)[0]

    def write_metadata(self, writer) -> None:
        write_hypercube(writer, self.calibration, self.concepts)


def check_options(opts: HypercubeOptions, n_ff: int, n_layer: int, down_types: list) -> None:
    """Before any work: the options fit the model and every ffn_down's encoding (a recipe may give
    layers different types). The calibration file is checked where it is read, which comes first."""
    if not 1 <= opts.dim <= MAX_DIM:
        raise InputError(f"--hypercube-dim {opts.dim}; expected 1..{MAX_DIM}")
    cube = Hypercube(opts.dim)
    if n_ff % cube.n_vertices:
        raise InputError(f"--hypercube-dim {opts.dim}: n_ff {n_ff} is not divisible by {cube.n_vertices} vertex groups")
    g = n_ff // cube.n_vertices
    down = max(down_types, key=lambda q: q.block_size)
    if g % down.block_size:
        raise InputError(
            f"--hypercube-dim {opts.dim}: groups of {g} neurons do not fill whole {down.name} blocks of {down.block_size} "
            f"in ffn_down's rows, so the routed engine could not slice them; use a smaller dimension "
            f"(n_ff {n_ff} / 2^d must be a multiple of {down.block_size}) or a type with smaller blocks for ffn_down")
    if opts.concepts is not None and not opts.concepts.is_file():
        raise InputError(f"{opts.concepts}: no such concepts file; expected lines of 'name: text'")
    if opts.source is None and opts.calib_tokens < 64:
        raise InputError(f"--calib-tokens {opts.calib_tokens}; expected at least 64")
    if opts.router not in ROUTERS:
        raise InputError(f"--router {opts.router!r}; expected one of {', '.join(ROUTERS)}")
    if opts.router_radius is not None and not 0 <= opts.router_radius < opts.dim:
        raise InputError(f"--router-radius {opts.router_radius}; expected 0..{opts.dim - 1} for --hypercube-dim {opts.dim} "
                         f"(radius {opts.dim} is the dense FFN)")
    if opts.concept_layer is not None and not 0 <= opts.concept_layer < n_layer:
        raise InputError(f"--concept-layer {opts.concept_layer}; expected 0..{n_layer - 1}")


def routing_from(path: Path, arch) -> Calibration:
    """--hypercube-from: a hypercube file's routers, groups and calibration record, checked
    against the checkpoint being converted (e.g. one fine-tuned with `finetune --routed path`)."""
    info = read_routing_file(path, arch.n_layer, arch.n_embd, arch.n_ff, "--hypercube-from")
    layers = [LayerRouter(w, b, p, c) for w, b, p, c in
              zip(info.router_weight, info.router_bias, info.permutation, info.vertex_counts)]
    return Calibration(info.dim, info.group_size, layers, info.calib_tokens, info.calib_sha256, info.router_method,
                       info.router_radius, info.compensation)


def build_hypercube(ckpt, arch, opts: HypercubeOptions, log: Callable[[str], None],
                    reused: Calibration | None = None) -> HypercubeBuild:
    """Calibrate (or take `reused`, read from opts.source), then the concept map."""
    model = None if reused is not None and opts.concepts is None else checkpoint_model(ckpt, arch)  # our loader
    if reused is not None:
        cal = reused
        log(f"hypercube: Q_{cal.dim} routers and groups taken from {opts.source} ({cal.method})")
    else:
        tokens, sha = calibration_tokens(opts.calib, opts.calib_tokens, arch.n_vocab)
        cal = calibrate(model, tokens, opts.dim, sha, opts.router, opts.router_radius)
        worst = min(int(lr.counts.min()) for lr in cal.layers)
        how = "PCA router" if cal.method == "pca" else f"{cal.method} router for radius {cal.radius}"
        log(f"hypercube: Q_{opts.dim}, {1 << opts.dim} groups of {cal.group_size} neurons per layer, {how}, calibrated "
            f"on {len(tokens)} tokens of {opts.calib.name} (emptiest vertex: {worst} tokens)")
    concepts = None
    if opts.concepts is not None:
        tok = hf_tokenizer()
        layer = arch.n_layer // 2 if opts.concept_layer is None else opts.concept_layer
        concepts = build_concept_map(model, lambda text: encode_text(tok, text), read_concepts(opts.concepts),
                                     [lr.weight for lr in cal.layers], [lr.bias for lr in cal.layers], layer)
        log(f"hypercube: {len(concepts.names)} concepts mapped (layer {layer})")
    return HypercubeBuild(cal, concepts)
