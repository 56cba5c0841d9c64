"""`convert CKPT --recipe R -o F` with a pipeline recipe: the compressions in one declared order.

A pipeline recipe is TOML with an ordered array of `[[step]]` tables, each naming what it runs
(`run = ...`), and an optional `[calib]` table shared by the steps that read text:

    [calib]
    text = "../../shared/data/gutenberg/books/pg11.txt"   # relative to the recipe; --calib wins
    tokens = 16384                                         # first N tokens of the text
    ctx = 512                                              # calibration window

    [[step]]
    run = "prune"           # FFN neurons removed, the same number in every layer
    ffn = 0.25              # fraction in (0, 1) or a whole count
    importance = "activation"

    [[step]]
    run = "imatrix"         # importance matrix of the (pruned) model on the calibration text

    [[step]]
    run = "quantize"        # the conversion: type, method, per-tensor-group types
    type = "tq2_0"
    method = "gptq"
    act_order = true
    types = { "blk.*.ffn_down.weight" = "q4_k" }

    [[step]]
    run = "hypercube"       # vertex groups and routers stored in the same file
    dim = 2

Steps run in the order STEPS lists (each at most once, `quantize` required): prune writes a
checkpoint to a temporary directory beside the output; imatrix is held in memory; quantize and
hypercube are one conversion, in which the hypercube's neuron order is decided first and GPTQ
quantizes the reordered FFN (converter.convert). Everything is checked before the first step
runs; on any failure the temporary checkpoint is removed and no output is left.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .calib.collect import imatrix_of
from .calib.gptq import GPTQ_TERNARY_SCALE, METHODS, GptqOptions
from .calib.sequential import GptqConvert
from .converter import convert
from .converter.arch import arch_for
from .converter.checkpoint import open_checkpoint
from .converter.convert import check_output
from .converter.plan import DEFAULT_TERNARY_SCALE, Recipe
from .errors import InputError
from .hypercube.build import HypercubeOptions
from .hypercube.calibrate import ROUTERS, calibration_tokens
from .kernels import QUANT_TYPES
from .kernels.ternary import FITTED_SCALE_MODES, SCALE_MODES
from .prune import PruneConfig
from .prune import prune as run_prune
from .prune.importance import MEASURES, WEIGHT_ONLY

STEPS = ("prune", "imatrix", "quantize", "hypercube")  # the order a pipeline runs them in

_NUM = (int, float)
# step -> key -> (accepted Python types, what the value means); `run` names the step
KEYS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "prune": {"ffn": (_NUM, "fraction in (0, 1) or whole count of FFN neurons removed per layer"),
              "importance": ((str,), f"importance measure ({' | '.join(MEASURES)})"),
              "multiple_of": ((int,), "positive integer the kept width is rounded down to"),
              "bias_compensation": ((bool,), "true or false"),
              "seed": ((int,), "integer seed")},
    "imatrix": {"tokens": ((int,), "calibration tokens (whole windows of [calib] ctx)")},
    "quantize": {"type": ((str,), f"type of the linear layers ({' | '.join(sorted(QUANT_TYPES))})"),
                 "embed_type": ((str,), "type of the embeddings and head"),
                 "method": ((str,), f"quantization method ({' | '.join(METHODS)})"),
                 "act_order": ((bool,), "true or false"),
                 "damp": (_NUM, "GPTQ dampening, a fraction of the mean Hessian diagonal"),
                 "block": ((int,), "GPTQ lazy-batch width in columns"),
                 "ternary_scale": ((str,), f"ternary scale rule ({' | '.join(SCALE_MODES + FITTED_SCALE_MODES)})"),
                 "types": ((dict,), "table of tensor-name glob -> type"),
                 "strict": ((bool,), "true or false")},
    "hypercube": {"dim": ((int,), "hypercube dimension (2^dim FFN groups)"),
                  "router": ((str,), f"router ({' | '.join(ROUTERS)})"),
                  "router_radius": ((int,), "radius the router is fitted for"),
                  "tokens": ((int,), "calibration tokens for the routers")},
}
CALIB_KEYS = {"text": ((str,), "path of a UTF-8 calibration text (relative to the recipe)"),
              "tokens": ((int,), "calibration tokens"),
              "ctx": ((int,), "calibration window in tokens")}


@dataclass
class Pipeline:
    path: Path
    steps: dict[str, dict]                    # step -> its keys, in STEPS order
    calib: dict = field(default_factory=dict)

    def where(self, step: str) -> str:
        return f"{self.path}: [[step]] {list(self.steps).index(step) + 1} (run = \"{step}\")"

    @property
    def needs_text(self) -> bool:
        q = self.steps.get("quantize", {})
        return ("imatrix" in self.steps or "hypercube" in self.steps or q.get("method") == "gptq"
                or ("prune" in self.steps and self._prune_reads_text))

    @property
    def _prune_reads_text(self) -> bool:
        p = self.steps["prune"]
        return p.get("bias_compensation", True) or p.get("importance", "activation") not in WEIGHT_ONLY


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None


def is_pipeline(path: Path) -> bool:
    """A recipe with `[[step]]` tables (else it is a table of tensor-name globs -> types)."""
    return path.suffix.lower() != ".json" and path.is_file() and "step" in read_toml(path)


def _checked(where: str, table: dict, keys: dict) -> dict:
    out = {}
    for key, value in table.items():
        if key not in keys:
            raise InputError(f"{where}: key {key!r} is unknown; expected one of {', '.join(keys)}")
        kinds, meaning = keys[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise InputError(f"{where}: {key} = {value!r}; expected the {meaning}")
        out[key] = value
    return out


def load_pipeline(path: Path) -> Pipeline:
    data = read_toml(path)
    raw = data.get("step")
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise InputError(f"{path}: 'step' must be an array of [[step]] tables, each with run = one of {', '.join(STEPS)}")
    extra = sorted(set(data) - {"step", "calib"})
    if extra:
        raise InputError(f"{path}: table [{extra[0]}] is not part of a pipeline recipe; expected [calib] and [[step]] "
                         f"tables (per-tensor types go in the quantize step's types = {{...}})")
    steps: dict[str, dict] = {}
    for i, table in enumerate(raw, 1):
        where = f"{path}: [[step]] {i}"
        name = table.get("run")
        if name not in STEPS:
            raise InputError(f"{where}: run = {name!r} is not a step; expected one of {', '.join(STEPS)}")
        if name in steps:
            raise InputError(f"{where}: a second \"{name}\" step; each step runs at most once")
        later = [s for s in steps if STEPS.index(s) > STEPS.index(name)]
        if later:
            raise InputError(f"{where}: \"{name}\" after \"{later[0]}\"; steps run in the order {' -> '.join(STEPS)}")
        steps[name] = _checked(f"{where} (run = \"{name}\")", {k: v for k, v in table.items() if k != "run"}, KEYS[name])
    if "quantize" not in steps:
        raise InputError(f"{path}: no \"quantize\" step; a pipeline ends in a conversion (run = \"quantize\", type = ...)")
    calib = data.get("calib", {})
    if not isinstance(calib, dict):
        raise InputError(f"{path}: 'calib' must be a table ([calib] text = ..., tokens = ..., ctx = ...)")
    pipe = Pipeline(path, steps, _checked(f"{path}: [calib]", calib, CALIB_KEYS))
    _check_values(pipe)
    return pipe


def _check_values(p: Pipeline) -> None:
    """Values that the key's type alone does not rule out, each named with its step and key."""
    if "prune" in p.steps:
        s, w = p.steps["prune"], p.where("prune")
        ffn = s.get("ffn")
        if ffn is None:
            raise InputError(f"{w}: no ffn; expected the fraction in (0, 1) or whole count of neurons removed per layer")
        if not (0 < ffn < 1 or (ffn >= 1 and float(ffn).is_integer())):
            raise InputError(f"{w}: ffn = {ffn!r}; expected a fraction in (0, 1) or a whole count of neurons >= 1")
        if s.get("importance", "activation") not in MEASURES:
            raise InputError(f"{w}: importance = {s['importance']!r}; expected {' | '.join(MEASURES)}")
        if s.get("multiple_of", 32) < 1:
            raise InputError(f"{w}: multiple_of = {s['multiple_of']}; expected a positive integer")
    q, w = p.steps["quantize"], p.where("quantize")
    for key in ("type", "embed_type"):
        if key in q and q[key] not in QUANT_TYPES:
            raise InputError(f"{w}: {key} = {q[key]!r}; expected one of {', '.join(sorted(QUANT_TYPES))}")
    if "type" not in q:
        raise InputError(f"{w}: no type; expected the type of the linear layers ({' | '.join(sorted(QUANT_TYPES))})")
    if q.get("method", "rtn") not in METHODS:
        raise InputError(f"{w}: method = {q['method']!r}; expected {' | '.join(METHODS)}")
    if q.get("method", "rtn") != "gptq" and any(k in q for k in ("act_order", "damp", "block")):
        raise InputError(f"{w}: act_order, damp and block are GPTQ's; set method = \"gptq\" or drop them")
    scales = SCALE_MODES + FITTED_SCALE_MODES
    if q.get("ternary_scale", "tensor") not in scales:
        raise InputError(f"{w}: ternary_scale = {q['ternary_scale']!r}; expected {' | '.join(scales)}")
    for glob, t in q.get("types", {}).items():
        if t not in QUANT_TYPES:
            raise InputError(f"{w}: types.\"{glob}\" = {t!r}; expected one of {', '.join(sorted(QUANT_TYPES))}")
    for key in ("tokens", "ctx"):
        if key in p.calib and p.calib[key] < (64 if key == "tokens" else 16):
            raise InputError(f"{p.path}: [calib] {key} = {p.calib[key]}; expected at least {64 if key == 'tokens' else 16}")
    if "hypercube" in p.steps and "dim" not in p.steps["hypercube"]:
        raise InputError(f"{p.where('hypercube')}: no dim; expected the hypercube dimension (2^dim FFN groups)")
    if "imatrix" in p.steps and p.steps["imatrix"].get("tokens", 64) < 64:
        raise InputError(f"{p.where('imatrix')}: tokens = {p.steps['imatrix']['tokens']}; expected at least 64")


def _calib_text(p: Pipeline, override: Path | None) -> Path | None:
    if override is not None:
        return override
    if "text" not in p.calib:
        if p.needs_text:
            raise InputError(f"{p.path}: its steps read calibration text and the recipe names none; give [calib] "
                             "text = \"FILE\" or --calib FILE")
        return None
    path = Path(p.calib["text"])
    return path if path.is_absolute() else (p.path.parent / path)


def run_pipeline(src: Path, out: Path, p: Pipeline, *, calib: Path | None = None, eval_text: Path | None = None,
                 force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the recipe's steps on the checkpoint SRC and write OUT; returns a summary (per-step
    seconds, sizes, and with `eval_text` the held-out PPL before (f16 of SRC) and after)."""
    t_start = time.perf_counter()
    ckpt = open_checkpoint(src)
    check_output(out, force, ckpt.files + [src / "config.json"])
    text = _calib_text(p, calib)
    tokens = p.calib.get("tokens", 8192)
    ctx = p.calib.get("ctx")
    arch = arch_for(ckpt)
    if text is not None:  # the text and its window, checked before any step runs
        ids, _ = calibration_tokens(text, tokens, arch.n_vocab)
        window = min(512, arch.n_ctx) if ctx is None else ctx
        if ctx is not None and not 16 <= ctx <= arch.n_ctx:
            raise InputError(f"{p.path}: [calib] ctx = {ctx}; expected 16 .. {arch.n_ctx} (the model's context)")
        if (p.steps["quantize"].get("method") == "gptq" or "imatrix" in p.steps) and len(ids) < window:
            raise InputError(f"{text}: {len(ids)} calibration tokens ([calib] tokens = {tokens}); the recipe's GPTQ / "
                             f"imatrix steps need at least one window of {window} tokens")
    if eval_text is not None and not eval_text.is_file():
        raise InputError(f"{eval_text}: no such --eval-text file; expected a UTF-8 text file")
    summary: dict = {"recipe": str(p.path), "source": str(src), "output": str(out), "steps": []}
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.pipeline-", dir=out.parent if out.parent.exists() else None))
    try:
        current, imatrix = src, None
        n = len(p.steps)
        for i, (name, s) in enumerate(p.steps.items(), 1):
            if name == "hypercube":
                continue  # part of the quantize step's conversion (its neuron order decided first)
            log(f"pipeline: step {i}/{n}: {name}")
            t0 = time.perf_counter()
            if name == "prune":
                pruned = work / "pruned"
                r = run_prune(PruneConfig(str(current), str(pruned), float(s["ffn"]),
                                          s.get("importance", "activation"), [str(text)] if text else [], tokens,
                                          ctx or 512, s.get("multiple_of", 32), s.get("bias_compensation", True),
                                          s.get("seed", 0)), log=log)
                current = pruned
                info = {"kept_per_layer": r["kept_per_layer"], "n_ff": r["n_ff"]}
            elif name == "imatrix":
                imatrix, info = imatrix_of(current, text, s.get("tokens", 65_536), ctx)
                if "warning" in info:
                    log(f"warning: {info['warning']}")
                info = {"tokens": info["tokens"], "entries": info["entries"]}
            else:
                result = _convert(current, out, p, text, tokens, ctx, imatrix, force, progress, log)
                info = {"bytes": result.bytes, "tensor_types": result.tensor_types}
            summary["steps"].append({"step": name, "seconds": round(time.perf_counter() - t0, 2), **info})
            log(f"pipeline: {name} done in {time.perf_counter() - t0:.1f} s")
        summary["seconds"] = round(time.perf_counter() - t_start, 2)
        summary["bytes"] = out.stat().st_size
        summary.update(_before_after(src, out, p, eval_text, min(512, arch.n_ctx), work, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _convert(src: Path, out: Path, p: Pipeline, text: Path | None, tokens: int, ctx: int | None, imatrix,
             force: bool, progress: bool, log):
    q = p.steps["quantize"]
    method = q.get("method", "rtn")
    scale = q.get("ternary_scale", GPTQ_TERNARY_SCALE if method == "gptq" else DEFAULT_TERNARY_SCALE)
    recipe = Recipe(q["type"], q.get("embed_type"), list(q.get("types", {}).items()), scale, q.get("strict", False))
    gptq = None
    if method == "gptq":
        opts = GptqOptions(float(q.get("damp", GptqOptions.damp)), q.get("block", GptqOptions.block),
                           q.get("act_order", False))
        gptq = GptqConvert(text, tokens, ctx, opts, imatrix, scale)
    cube = None
    if "hypercube" in p.steps:
        h = p.steps["hypercube"]
        cube = HypercubeOptions(h["dim"], text, h.get("tokens", tokens), router=h.get("router", "learned"),
                                router_radius=h.get("router_radius"))
    return convert(src, out, recipe, force=force, progress=progress, log=log, hypercube=cube, imatrix=imatrix,
                   method=gptq)


def _before_after(src: Path, out: Path, p: Pipeline, eval_text: Path | None, ctx: int, work: Path, log) -> dict:
    """Sizes, and with `eval_text` the PPL of SRC as f16 and of OUT in llama.cpp (and, for a
    hypercube file, in the routed engine at the radius its router was fitted for)."""
    from .eval.perplexity import llama_perplexity

    f16 = work / "before-f16.gguf"
    convert(src, f16, "f16", progress=False, log=lambda m: None)
    res = {"before_bytes": f16.stat().st_size}
    if eval_text is None:
        return res
    text = eval_text.read_text(encoding="utf-8", errors="replace")
    before = llama_perplexity(f16, text, ctx)
    after = llama_perplexity(out, text, ctx)
    res.update(eval_text=str(eval_text), before_ppl=round(before.ppl, 3), after_ppl=round(after.ppl, 3),
               ppl_ratio=round(after.ppl / before.ppl, 4), eval_tokens=after.tokens_scored)
    if "hypercube" in p.steps:
        from .engine.build import EngineUnavailable
        from .eval.routed import routed_perplexity
        from .gguf_file import read_gguf
        from .hypercube.metadata import read_hypercube

        info = read_hypercube(read_gguf(out), out)
        radius = info.router_radius if info.router_radius is not None else min(1, info.dim - 1)
        try:
            r = routed_perplexity(out, text, ctx, radius=radius)
            res.update(routed_radius=radius, routed_ppl=round(r.ppl, 3), routed_ppl_ratio=round(r.ppl / before.ppl, 4))
        except EngineUnavailable as e:
            log(f"pipeline: routed engine unavailable ({e}); no routed PPL")
    return res
