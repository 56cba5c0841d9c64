"""Where quantization-aware training starts (`finetune --qat TYPE --init ...`).

 - no --init: the checkpoint's own weights; the first forward pass rounds them to nearest;
 - `--init gptq --calib TEXT`: GPTQ (act-order, calib.sequential, the code `convert --method gptq
   --act-order` runs) quantizes the linear weights now, on the same plan of types QAT trains, and
   the latent weights become the values that conversion stores;
 - `--init FILE.gguf`: the values a GGUF file of this checkpoint's shape stores (any conversion:
   GPTQ with an importance matrix, a recipe), every tensor dequantized. Its types must be the ones
   QAT plans and its ternary scale rule the one QAT trains with, and it must not be a hypercube
   file (its FFN neurons are in vertex order, not the checkpoint's).

A value s * {-1, 0, 1} per row is a fixed point of every ternary scale rule (absmean keeps an
already-ternary row's magnitude, the fitted rule's least-squares refit finds s with zero error),
so step 0 of training computes with exactly the stored values and converting the latent weights
before any update writes the same ternary bytes back. Block types with a fitted grid (q4_0,
q4_k, q6_k, q8_0) are not fixed points of QAT's round-to-nearest rule: it re-fits each block's
scale on the GPTQ values (whose extreme codes error feedback may have moved), and 16-25 % of a
q4_k tensor's weights, 4-8 % of a q4_0 or q6_k tensor's move by a grid step (tests/test_qat_init.py
fixture); `start_from` measures that share per type, warns, and records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .. import constants as K
from ..converter.plan import PlannedTensor, Recipe, plan_types
from ..errors import InputError
from ..kernels import get_quant_type
from .qat import model_specs, param_name

GPTQ_INIT = "gptq"


def check_init(init: str | None, qat: str | None, calib: str | None) -> None:
    """The option combinations `--init` allows, before anything is loaded."""
    if init is None:
        if calib is not None:
            raise InputError("--calib goes with --init gptq (the text GPTQ calibrates the starting point on)")
        return
    if qat is None:
        raise InputError(f"--init {init} sets where quantization-aware training starts; expected --qat TYPE with it")
    if init == GPTQ_INIT:
        if calib is None:
            raise InputError("--init gptq needs --calib TEXT (the calibration text its Hessians come from)")
    elif calib is not None:
        raise InputError(f"--calib goes with --init gptq; --init {init} takes the values stored in that file")
    elif not Path(init).is_file():
        raise InputError(f"--init {init}: no such GGUF file; expected 'gptq' or a GGUF file of this checkpoint")


def file_scale_rule(init: str | None) -> str | None:
    """The ternary scale rule a `--init FILE` stores (None without one, or without ternary tensors)."""
    if init is None or init == GPTQ_INIT or not Path(init).is_file():
        return None
    from ..gguf_file import read_header

    rule = read_header(Path(init)).kv.get(K.KEY_TERNARY_SCALE)
    return rule if isinstance(rule, str) else None


def start_from(model, recipe: Recipe, init: str, *, calib: str | None, calib_tokens: int, calib_ctx: int | None,
               log: Callable[[str], None]) -> dict:
    """Put the starting values into `model` (float32 transformers GPT-2 on the CPU) in place;
    the record that finetune.json keeps."""
    planned, _ = plan_types(model_specs(model.config), recipe)
    if init == GPTQ_INIT:
        record = _gptq_start(model, planned, recipe, Path(calib), calib_tokens, calib_ctx, log)
    else:
        record = _file_start(model, planned, recipe, Path(init), log)
    moved = moved_by_qat(model, planned, recipe)
    if moved:
        log("warning: --init: QAT's round-to-nearest rule re-fits the grids of " + ", ".join(
            f"{t} ({m['tensors']} tensors: {100 * m['moved']:.1f} % of their weights move off the stored values)"
            for t, m in moved.items()) + "; ternary tensors start exactly at them")
        record["moved_by_qat"] = moved
    return record


def moved_by_qat(model, planned: list[PlannedTensor], recipe: Recipe) -> dict[str, dict]:
    """Per non-ternary grid type of the linear weights: how many tensors, and the share of their
    weights that QAT's fake quantizer moves from where `model` holds them (0 for a fixed point)."""
    from .fakequant import fake_quant

    params = dict(model.named_parameters())
    out: dict[str, dict] = {}
    for p in planned:
        qt = get_quant_type(p.qtype.name)
        if p.spec.role != "linear" or not qt.has_grid or qt.is_ternary:
            continue
        w = params[param_name(p.spec)].detach().float()
        w = w.t() if p.spec.transpose else w
        n = int((fake_quant(qt.name, w.contiguous(), recipe.ternary_scale) != w).sum())
        m = out.setdefault(qt.name, {"tensors": 0, "moved_weights": 0, "weights": 0})
        m["tensors"] += 1
        m["moved_weights"] += n
        m["weights"] += w.numel()
    for m in out.values():
        m["moved"] = round(m["moved_weights"] / m["weights"], 4)
    return {t: m for t, m in out.items() if m["moved_weights"]}


def _gptq_start(model, planned: list[PlannedTensor], recipe: Recipe, calib: Path, calib_tokens: int,
                calib_ctx: int | None, log) -> dict:
    from ..calib.gptq import GptqOptions
    from ..calib.sequential import GptqConvert

    c = model.config
    gptq = GptqConvert(calib, calib_tokens, calib_ctx, GptqOptions(act_order=True), None, recipe.ternary_scale)
    windows, calibration = gptq.windows(c.n_positions, c.vocab_size)
    was_training = model.training
    model.eval()  # no dropout in the calibration forward
    try:
        encoded = gptq.quantize_model(model, windows, planned, log)
    finally:
        model.train(was_training)
    log(f"--init gptq: {len(encoded)} linear weights at their GPTQ values ({calibration['tokens']} tokens of "
        f"{calib.name}, act-order)")
    return {"init": GPTQ_INIT, "act_order": True, "tensors": len(encoded), **calibration}


def _file_start(model, planned: list[PlannedTensor], recipe: Recipe, path: Path, log) -> dict:
    import torch

    from ..gguf_file import field_value, read_gguf
    from ..hypercube.metadata import has_hypercube
    from ..models import file_weight

    reader = read_gguf(path)
    if has_hypercube(reader):
        raise InputError(f"--init {path}: a hypercube file (its FFN neurons are in vertex order); expected a file "
                         "converted without --hypercube-dim")
    tensors = {t.name: t for t in reader.tensors}
    want = {p.spec.gguf_name: p for p in planned}
    for name, p in want.items():
        t = tensors.get(name)
        if t is None:
            raise InputError(f"--init {path}: no tensor {name}; expected a GGUF file converted from a checkpoint of "
                             "this one's shape")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if shape != tuple(p.spec.shape):
            raise InputError(f"--init {path}: tensor {name} is {list(shape)}; this checkpoint's is {list(p.spec.shape)} "
                             "(expected a file converted from a checkpoint of this shape)")
        stored = t.tensor_type.name.lower()
        if stored != p.qtype.name:
            raise InputError(f"--init {path}: tensor {name} is stored as {stored}; --qat plans {p.qtype.name} "
                             "for it (expected a file converted with the same --type, --embed-type and --recipe)")
    ternary = any(get_quant_type(p.qtype.name).is_ternary for p in planned)
    rule = field_value(reader, K.KEY_TERNARY_SCALE)
    if ternary and rule != recipe.ternary_scale:
        raise InputError(f"--init {path}: its ternary scale rule is {rule}; --ternary-scale {recipe.ternary_scale} "
                         "would train other values than it stores (expected the same rule)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in want.items():
            w = file_weight(tensors[name], p.spec, path)
            params[param_name(p.spec)].copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    log(f"--init {path.name}: {len(want)} tensors at the values the file stores")
    return {"init": str(path), "tensors": len(want)}
