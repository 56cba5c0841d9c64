"""The `gpt2cube` command line: one click group; results on stdout, logs on stderr."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import Gpt2cubeError, InputError
from .eval.spam import SPLITS as SPAM_SPLITS
from .finetune.loop import TASKS as FT_TASKS
from .hypercube.calibrate import ROUTERS as HC_ROUTERS
from .calib.gptq import METHODS as QUANT_METHODS
from .calib.gptq import GPTQ_TERNARY_SCALE, GptqOptions
from .kernels import QUANT_TYPES
from .kernels.ternary import FITTED_SCALE_MODES as FITTED_TERNARY_SCALES
from .kernels.ternary import SCALE_MODES as TERNARY_SCALES
from .train.ngram import METHODS as NGRAM_METHODS
from .train.trainer import PRESETS  # light: torch is imported only when training starts
from .variants.spec import (ATTENTIONS, DUO_LOSSES, NEURAL_KINDS, PARALLEL_PATHS, POSITIONS,
                             ROTATING_FREQS)

PRECISION_HELP = ("Compute precision: bf16 autocast (fp32 master weights) or fp32; auto = bf16 where it is native "
                  "(CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.")


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library exceptions to one clear line on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Gpt2cubeError as e:
            if not getattr(e, "quiet", False):  # quiet: another rank of a torchrun job prints the line
                click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def _distributed_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torchrun's options for `train` and `finetune` (see README, Training on several devices)."""
    for opt in reversed([
        click.option("--micro-batch", type=int, default=None,
                     help="Items per forward on one process; gradient accumulation fills the global --batch-size "
                          "[default: --batch-size / processes]."),
        click.option("--fsdp", is_flag=True, help="Under torchrun: shard parameters, gradients and optimizer state "
                     "over the processes (FSDP2) for models that do not fit one device; the checkpoint written is "
                     "a plain full state dict."),
        click.option("--dist-timeout", type=float, default=600.0, show_default=True,
                     help="Under torchrun: seconds a collective waits for the other processes before the job fails."),
    ]):
        fn = opt(fn)
    return fn


def _rank0() -> bool:
    from .loop.world import current

    return current().main


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpt2cube")
def main() -> None:
    """Convert GPT-2-family checkpoints to GGUF files that stock llama.cpp runs."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="GGUF file to write.")
@click.option("--type", "out_type", type=click.Choice(sorted(QUANT_TYPES)), default="f16", show_default=True,
              help="Encoding of the linear layers (attn_qkv, attn_output, ffn_up, ffn_down).")
@click.option("--embed-type", type=click.Choice(sorted(QUANT_TYPES)), default=None,
              help="Encoding of token/position embeddings and the output head "
                   "[default: q6_k for ternary --type (as llama.cpp's TQ files), else --type; a `finetune --qat` "
                   "checkpoint: the type it was trained for].")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="TOML or JSON table of tensor-name glob -> type, applied last (last match wins).")
@click.option("--ternary-scale", type=click.Choice(TERNARY_SCALES + FITTED_TERNARY_SCALES), default=None,
              help="BitNet absmean scale per tensor or per output row, or row-fit: per row, the float16 scale of "
                   "least squared error (weighted by --imatrix, or under --method gptq by the calibration inputs) "
                   "[default: the rule a `finetune --qat` checkpoint was trained with (its finetune.json), else tensor; "
                   "row-fit with --method gptq].")
@click.option("--strict", is_flag=True, help="Fail instead of falling back when a row does not fit a type.")
@click.option("--method", type=click.Choice(QUANT_METHODS), default="rtn", show_default=True,
              help="rtn: round to nearest, tensor by tensor. gptq: error feedback (GPTQ) on --calib text, block by "
                   "block, for q4_0, q4_k, q6_k, tq2_0 and tq1_0 linear tensors (other types round to nearest).")
@click.option("--gptq-damp", type=float, default=GptqOptions.damp, show_default=True,
              help="GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean.")
@click.option("--gptq-block", type=int, default=GptqOptions.block, show_default=True,
              help="GPTQ: lazy-batch width in columns (rounded up to a multiple of the type's block).")
@click.option("--act-order", is_flag=True,
              help="GPTQ: quantize columns by decreasing Hessian diagonal (block scales fitted first on the original "
                   "weights).")
@click.option("--calib-ctx", type=int, default=None,
              help="GPTQ: calibration window in tokens [default: 512, or the model's context if shorter].")
@click.option("--hypercube-dim", type=int, default=None,
              help="Split each FFN into 2^D vertex groups, calibrate routers and store them as hypercube.* metadata.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text file for the hypercube routers (needed with --hypercube-dim) or for "
                   "--method gptq.")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens to use.")
@click.option("--hypercube-from", "hypercube_from", type=click.Path(path_type=Path), default=None,
              help="Reuse this hypercube GGUF's routers and groups instead of calibrating (e.g. after finetune --routed "
                   "FILE); the checkpoint must have the same shape.")
@click.option("--router", type=click.Choice(list(HC_ROUTERS)), default="learned", show_default=True,
              help="How the hypercube routers and vertex groups are fitted: "
                   + "; ".join(f"{k}: {v[0]}" for k, v in HC_ROUTERS.items()) + ".")
@click.option("--router-radius", type=int, default=None,
              help="The radius a learned router is fitted for [default: 1, or 0 with --hypercube-dim 1].")
@click.option("--concepts", type=click.Path(path_type=Path), default=None,
              help="Concept map: lines of 'name: text', placed on the cube by the model's hidden states.")
@click.option("--concept-layer", type=int, default=None, help="Layer the concept map is read at [default: middle].")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path), default=None,
              help="Importance matrix (`gpt2cube imatrix`, or llama-imatrix's .gguf / .dat): q4_0, q4_k and q6_k "
                   "linear tensors minimise the importance-weighted error, as llama-quantize --imatrix does.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="With a pipeline --recipe: held-out text scored before (SRC as f16) and after, in llama.cpp "
                   "(and the routed engine for a hypercube file).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@_fail_cleanly
@click.pass_context
def convert(cctx, src: Path, out: Path, out_type: str, embed_type: str | None, recipe_file: Path | None,
            ternary_scale: str | None, strict: bool, method: str, gptq_damp: float, gptq_block: int, act_order: bool,
            calib_ctx: int | None, hypercube_dim: int | None, calib: Path | None, calib_tokens: int,
            hypercube_from: Path | None, router: str, router_radius: int | None, concepts: Path | None, concept_layer: int | None,
            imatrix_file: Path | None, eval_text: Path | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Convert the Hugging Face checkpoint directory SRC to a GGUF file.

    Norms and biases always stay f32. Ternary types (tq1_0, tq2_0) apply BitNet b1.58 absmean
    ternarization first; sparsity per tensor is reported. A --recipe with [[step]] tables is a
    pipeline (prune, imatrix, quantize, hypercube in that order; gpt2cube/pipeline.py): it
    takes everything from the file except --calib, --eval-text, --force, --quiet and --json."""
    from .converter import convert as run_convert
    from .converter.plan import DEFAULT_TERNARY_SCALE, Recipe, embed_type_for, load_recipe_file, ternary_scale_for
    from .pipeline import is_pipeline

    if recipe_file is not None and is_pipeline(recipe_file):
        _convert_pipeline(cctx, src, out, recipe_file, calib, eval_text, force, quiet, as_json)
        return
    if eval_text is not None:
        raise click.UsageError("--eval-text goes with a pipeline --recipe (a recipe with [[step]] tables)")
    patterns = load_recipe_file(recipe_file) if recipe_file else []
    # GPTQ rounds onto the scale it starts from and absmean starts it far off (reference, tq2_0,
    # --act-order, torch on 6 held-out windows: 7.5x the f16 PPL per tensor, 4.2x per row, 1.19x
    # row-fit), so row-fit is its default
    default_scale = GPTQ_TERNARY_SCALE if method == "gptq" else DEFAULT_TERNARY_SCALE
    recipe = Recipe(out_type, embed_type_for(src, embed_type), patterns,
                    ternary_scale_for(src, ternary_scale, _log, default_scale), strict)
    if method == "gptq":
        if calib is None:
            raise click.UsageError("--method gptq needs --calib TEXT (the calibration text its Hessians come from)")
    elif act_order or calib_ctx is not None:
        raise click.UsageError("--act-order and --calib-ctx are options of --method gptq")
    cube = None
    if hypercube_from is not None:
        from .hypercube.build import HypercubeOptions

        if hypercube_dim is not None or (calib is not None and method != "gptq") or router_radius is not None:
            raise click.UsageError("--hypercube-from takes the dimension, routers and groups from its file; "
                                   "drop --hypercube-dim, --router-radius and --calib (unless --method gptq needs it)")
        cube = HypercubeOptions(0, None, calib_tokens, concepts, concept_layer, source=hypercube_from)
    elif hypercube_dim is not None or concepts is not None or (method != "gptq" and calib is not None):
        from .hypercube.build import HypercubeOptions

        # with --method gptq, --calib feeds both: the routers are fitted first, then GPTQ
        if hypercube_dim is None or calib is None:
            raise click.UsageError("--hypercube-dim and --calib go together (and --concepts needs both)")
        cube = HypercubeOptions(hypercube_dim, calib, calib_tokens, concepts, concept_layer, router, router_radius)
    imatrix = None
    if imatrix_file is not None:
        from .calib.imatrix_file import read_imatrix
        from .converter.plan import recorded_ternary_scale

        imatrix = read_imatrix(imatrix_file)
        if src.is_dir() and recorded_ternary_scale(src) in FITTED_TERNARY_SCALES:
            _log(f"warning: {src} was quantization-aware trained with the unweighted --ternary-scale "
                 f"{recorded_ternary_scale(src)}; --imatrix weighs the ternary scales, so the file stores other "
                 "values than it was trained on")
    gptq = None
    if method == "gptq":
        from .calib.sequential import GptqConvert

        gptq = GptqConvert(calib, calib_tokens, calib_ctx, GptqOptions(gptq_damp, gptq_block, act_order), imatrix,
                           recipe.ternary_scale)
    result = run_convert(src, out, recipe, force=force, progress=not quiet, log=_log, hypercube=cube, imatrix=imatrix,
                         method=gptq)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    if result.ternary:
        sp = [st["sparsity"] for st in result.ternary.values()]
        _log(f"ternary: {len(sp)} tensors, sparsity min {min(sp):.3f} mean {sum(sp) / len(sp):.3f} "
             f"max {max(sp):.3f} (per tensor: --json or gpt2cube inspect)")
    types = ", ".join(f"{n} {t}" for t, n in result.tensor_types.items())
    click.echo(f"wrote {result.output} ({result.bytes / 1e6:.2f} MB, {types}) in {result.seconds:.2f} s")


def _convert_pipeline(cctx, src: Path, out: Path, recipe_file: Path, calib: Path | None, eval_text: Path | None,
                      force: bool, quiet: bool, as_json: bool) -> None:
    from .pipeline import load_pipeline, run_pipeline

    own = {"src", "out", "recipe_file", "calib", "eval_text", "force", "quiet", "as_json"}
    given = [k for k in cctx.params if k not in own
             and cctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if given:
        opt = "--" + given[0].replace("_file", "").replace("out_type", "type").replace("_", "-")
        raise click.UsageError(f"{opt} is set by the pipeline recipe {recipe_file}; give it in the recipe's steps")
    pipe = load_pipeline(recipe_file)
    summary = run_pipeline(src, out, pipe, calib=calib, eval_text=eval_text, force=force, progress=not quiet, log=_log)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    line = f"before: {summary['before_bytes'] / 1e6:.2f} MB (f16)"
    if "before_ppl" in summary:
        line += f", PPL {summary['before_ppl']:.2f}"
    line += f" -> after: {summary['bytes'] / 1e6:.2f} MB"
    if "after_ppl" in summary:
        line += f", PPL {summary['after_ppl']:.2f} ({summary['ppl_ratio']:.3f}x)"
    if "routed_ppl" in summary:
        line += f", routed at radius {summary['routed_radius']}: PPL {summary['routed_ppl']:.2f} ({summary['routed_ppl_ratio']:.3f}x)"
    if "eval_tokens" in summary:
        line += f" on {summary['eval_tokens']} tokens of {Path(summary['eval_text']).name}"
    click.echo(f"wrote {out} in {summary['seconds']:.1f} s; {line}")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--calib", required=True, type=click.Path(path_type=Path), help="Calibration text (UTF-8).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Importance matrix to write: GGUF as llama-imatrix writes it (a .dat name: its legacy format).")
@click.option("--calib-tokens", type=int, default=65_536, show_default=True,
              help="Use the first N tokens of the text (whole windows of --ctx).")
@click.option("--ctx", type=int, default=None, help="Window (llama-imatrix's chunk) length [default: 512, or the "
              "model's context if shorter].")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@_fail_cleanly
def imatrix(src: Path, calib: Path, out: Path, calib_tokens: int, ctx: int | None, force: bool) -> None:
    """Collect an importance matrix (mean squared input per column of every linear weight) of the
    HF checkpoint directory or GGUF file SRC on calibration text, for `convert --imatrix` and
    llama-quantize --imatrix."""
    from .calib.collect import imatrix_of
    from .converter.convert import check_output

    if not src.exists():
        raise InputError(f"{src}: no such checkpoint directory or GGUF file")
    check_output(out, force, [calib] + ([src] if src.is_file() else []))
    im, summary = imatrix_of(src, calib, calib_tokens, ctx)
    if "warning" in summary:
        _log(f"warning: {summary['warning']}")
    im.write(out)
    click.echo(json.dumps({"output": str(out), **summary}))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@_fail_cleanly
def inspect(file: Path, as_json: bool) -> None:
    """Show a GGUF file's architecture, hyper-parameters, tensors and metadata."""
    from .inspect_gguf import format_report, inspect_gguf

    info = inspect_gguf(file)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_report(info))


@main.group(name="eval")
def eval_group() -> None:
    """Evaluate a GGUF file in llama.cpp (through llama-cpp-python)."""


@eval_group.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="UTF-8 text to score.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length; the second half of each is scored.")
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path), default=None,
              help="Also score the same windows in PyTorch on this checkpoint (transformers, or a gpt2cube variant).")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows (quick runs).")
@click.option("--engine", type=click.Choice(["llama.cpp", "routed"]), default="llama.cpp", show_default=True,
              help="Run the file in stock llama.cpp or in gpt2cube's routed engine (cpp/).")
@click.option("--radius", type=int, default=None,
              help="Routed engine: compute the FFN groups within this Hamming radius [default: all = dense].")
@click.option("--device", default="cpu", show_default=True, help="Routed engine: cpu, auto (best GPU) or a ggml device.")
@click.option("--threads", type=int, default=None)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def perplexity(model: Path, text_file: Path, ctx: int, hf_dir: Path | None, max_windows: int | None, engine: str,
               radius: int | None, device: str, threads: int | None, quiet: bool, as_json: bool) -> None:
    """Perplexity of MODEL on a text, computed as llama.cpp's llama-perplexity does. MODEL is a GGUF
    file, or a checkpoint directory (a GPT-2 or any `train --pos` variant, the ones llama.cpp cannot
    run included) to score in PyTorch on the same windows."""
    from .eval.perplexity import hf_perplexity, llama_perplexity, read_text

    text = read_text(text_file)
    if model.is_dir():
        if engine != "llama.cpp" or radius is not None or hf_dir is not None:
            raise click.UsageError(f"{model} is a checkpoint directory, scored in PyTorch: --engine, --radius and "
                                   "--hf apply to GGUF files")
        results = [hf_perplexity(model, text, ctx, max_windows=max_windows, progress=not quiet)]
    elif engine == "routed":
        _require_file(model)
        from .eval.routed import routed_perplexity

        results = [routed_perplexity(model, text, ctx, radius, max_windows=max_windows, n_threads=threads,
                                     device=device, progress=not quiet)]
    elif radius is not None:
        raise click.UsageError("--radius needs --engine routed (stock llama.cpp always runs the dense FFN)")
    else:
        _require_file(model)
        results = [llama_perplexity(model, text, ctx, max_windows=max_windows, n_threads=threads, progress=not quiet)]
    if hf_dir is not None:
        results.append(hf_perplexity(hf_dir, text, ctx, max_windows=max_windows, progress=not quiet))
        if results[0].text_tokens != results[1].text_tokens:
            raise Gpt2cubeError(f"{text_file}: {results[0].engine} reads {results[0].text_tokens} tokens and transformers "
                                f"{results[1].text_tokens}: the two would score different windows; the model file's "
                                f"tokenizer and {hf_dir}'s differ")
    if as_json:
        click.echo(json.dumps([r.as_json() for r in results], indent=2))
        return
    for r in results:
        click.echo(f"{r.engine}: PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f} over {r.tokens_scored} tokens "
                   f"({r.windows} windows of {r.ctx}) in {r.seconds:.1f} s")
    if len(results) == 2:
        click.echo(f"relative difference: {abs(results[0].ppl / results[1].ppl - 1) * 100:.3f} %")


@eval_group.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="SMSSpamCollection (ham|spam<TAB>text).")
@click.option("--split", "split_name", type=click.Choice(sorted(SPAM_SPLITS)), default="stratified", show_default=True,
              help="stratified: " + SPAM_SPLITS["stratified"] + "; balanced: " + SPAM_SPLITS["balanced"]
                   + ". Both on the deduplicated collection.")
@click.option("--test-fraction", type=float, default=0.2, show_default=True, help="Stratified split's test share.")
@click.option("--seed", type=int, default=None, help="Seed of the split [default: 0 stratified, 123 balanced].")
@click.option("--shots", type=int, default=0, show_default=True, help="Few-shot examples in the prompt.")
@click.option("--limit", type=int, default=None, help="Score a seeded subsample of N test messages.")
@click.option("--no-probe", is_flag=True, help="Only the model answering (label likelihood); skip the linear probe.")
@click.option("--threads", type=int, default=None)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def spam(model: Path, data: Path, split_name: str, test_fraction: float, seed: int | None, shots: int,
         limit: int | None, no_probe: bool, threads: int | None, quiet: bool, as_json: bool) -> None:
    """SMS spam classification: prompted label likelihood and a linear probe on embeddings."""
    from .eval.spam import evaluate_spam

    _require_file(model)
    r = evaluate_spam(model, data, split=split_name, test_fraction=test_fraction, seed=seed, shots=shots, limit=limit,
                      n_threads=threads, progress=not quiet, probe=not no_probe)
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        return
    d, sp = r["deduplication"], r["split"]
    click.echo(f"{d['lines']} lines -> {d['distinct_messages']} distinct messages ({d['duplicates_removed']} duplicates "
               f"removed, {d['conflicting_texts_dropped']} texts labelled both ways dropped)")
    click.echo(f"{sp['name']} split, seed {sp['seed']}: train {sp['train']['messages']} ({sp['train']['spam']} spam), "
               f"validation {sp['validation']['messages']}, test {sp['test']['messages']} ({sp['test']['spam']} spam); "
               f"scored: {r['test']} test messages ({r['test_spam']} spam)" + (" (stratified subsample)" if r["limit"] else ""))
    for name in ("label_likelihood", "linear_probe"):
        if name not in r:
            continue
        m = r[name]
        c = m["confusion"]
        click.echo(f"{name:>16}: accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}  recall "
                   f"{m['recall']:.4f}  F1 {m['f1']:.4f}  [tp {c['tp']} fp {c['fp']} fn {c['fn']} tn {c['tn']}] "
                   f"{m['seconds']:.1f} s")
        if "answer" in m:
            a, c = m["answer"], m["answer"]["confusion"]
            click.echo(f"{'model answering':>16}: accuracy {a['accuracy']:.4f}  precision {a['precision']:.4f}  recall "
                       f"{a['recall']:.4f}  F1 {a['f1']:.4f}  [tp {c['tp']} fp {c['fp']} fn {c['fn']} tn {c['tn']}] "
                       "(threshold 0: ' spam' more likely than ' ham')")


@eval_group.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="HellaSwag in llama.cpp's text format.")
@click.option("--limit", type=int, default=None, help="A seeded random subset of N tasks (as llama.cpp does).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --limit subset.")
@click.option("--threads", type=int, default=None)
@click.option("--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def hellaswag(model: Path, data: Path, limit: int | None, seed: int, threads: int | None, quiet: bool,
              as_json: bool) -> None:
    """HellaSwag accuracy by length-normalised log-likelihood of each ending. MODEL is a GGUF file
    (llama.cpp) or a checkpoint directory (PyTorch; any `train --pos` variant or neural baseline)."""
    from .eval.hellaswag import evaluate_hellaswag

    if not model.is_dir():
        _require_file(model)
    r = evaluate_hellaswag(model, data, limit=limit, seed=seed, n_threads=threads, progress=not quiet)
    subset = f" (random subset, seed {r['seed']}, of {r['tasks_in_file']})" if r["tasks"] < r["tasks_in_file"] else ""
    click.echo(json.dumps(r, indent=2) if as_json else
               f"HellaSwag ({r['split']}): {r['accuracy'] * 100:.2f} % +/- {r['stderr'] * 100:.2f} over {r['tasks']} "
               f"tasks{subset} in {r['seconds']:.1f} s")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt (repeatable); default: four fixed prompts.")
@click.option("--n-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quality", is_flag=True, help="Also report distinct-n and repetition rate of the samples.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="GGUF whose perplexity of the samples is reported (with --quality).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def generate(model: Path, prompts, n_tokens: int, temperature: float, seed: int, quality: bool,
             reference: Path | None, threads: int | None, as_json: bool) -> None:
    """Generate text with MODEL in llama.cpp (and measure sample quality)."""
    from .eval.generate import DEFAULT_PROMPTS, sample_quality
    from .eval.generate import generate as run_generate

    _require_file(model)
    prompts = list(prompts) or DEFAULT_PROMPTS
    if quality:
        if reference is not None:
            _require_file(reference)
        r = sample_quality(model, prompts, reference=reference, n_tokens=n_tokens, seed=seed, n_threads=threads)
    else:
        r = {"samples": [{"prompt": p, "text": run_generate(model, p, n_tokens=n_tokens, temperature=temperature,
                                                            seed=seed + i, n_threads=threads)}
                         for i, p in enumerate(prompts)]}
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for s in r["samples"]:
        click.echo(f"--- {s['prompt']}{s['text']}")
    for k in ("distinct_1", "distinct_2", "distinct_3", "repetition_rate", "reference_ppl"):
        if k in r:
            click.echo(f"{k}: {r[k]:.4f}")


@main.command(name="bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--n-prompt", type=int, default=512, show_default=True, help="pp test: prompt tokens (as llama-bench -p).")
@click.option("--n-gen", type=int, default=128, show_default=True, help="tg test: generated tokens (as llama-bench -n).")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs after a warm-up (as llama-bench -r).")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def bench_cmd(model: Path, n_prompt: int, n_gen: int, repeats: int, threads: int | None, as_json: bool) -> None:
    """Load time, prompt (pp) and generation (tg) speed as llama-bench measures them, peak RSS."""
    from .eval.bench import bench

    _require_file(model)
    r = bench(model, n_prompt=n_prompt, n_gen=n_gen, repeats=repeats, n_threads=threads)
    click.echo(json.dumps(r, indent=2) if as_json else
               f"{model.name}: load {r['load_s']:.2f} s, pp{r['n_prompt']} {r['pp_tok_s']:.1f} +/- {r['pp_tok_s_std']:.1f} t/s, "
               f"tg{r['n_gen']} {r['tg_tok_s']:.1f} +/- {r['tg_tok_s_std']:.1f} t/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
               f"{r['file_mb']:.1f} MB, {r['threads']} threads")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for results and plots.")
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Text for perplexity.")
@click.option("--hf", "hf_dir", type=click.Path(path_type=Path), default=None, help="HF checkpoint: reference PPL.")
@click.option("--spam", "spam_data", type=click.Path(path_type=Path), default=None, help="SMSSpamCollection.")
@click.option("--hellaswag", "hellaswag_data", type=click.Path(path_type=Path), default=None)
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--max-windows", type=int, default=None)
@click.option("--spam-limit", type=int, default=None)
@click.option("--hellaswag-limit", type=int, default=200, show_default=True)
@click.option("--no-bench", is_flag=True)
@click.option("--threads", type=int, default=None)
@click.option("--quiet", is_flag=True)
@_fail_cleanly
def compare(models, out, text, hf_dir, spam_data, hellaswag_data, ctx, max_windows, spam_limit, hellaswag_limit,
            no_bench, threads, quiet) -> None:
    """Run the evaluations for each MODEL and write results.json, a table and plots to --out."""
    from .eval.report import run_compare

    for m in models:
        _require_file(m)
    r = run_compare(list(models), out, text=text, hf=hf_dir, spam=spam_data, hellaswag=hellaswag_data, ctx=ctx,
                    max_windows=max_windows, spam_limit=spam_limit, hellaswag_limit=hellaswag_limit,
                    do_bench=not no_bench, n_threads=threads, progress=not quiet, log=_log)
    from .eval.report import markdown_table

    click.echo(markdown_table(r))


def _require_file(path: Path) -> None:
    from .errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: no such model file; expected a GGUF file")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--radius", type=int, default=None, help="Hamming radius of the FFN groups [default: all = dense].")
@click.option("-n", "--n-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, auto (best GPU) or a ggml device name.")
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Also the vertex of every generated token per layer.")
@_fail_cleanly
def route(model: Path, prompt: str, radius: int | None, n_tokens: int, temperature: float, top_k: int, seed: int,
          device: str, threads: int | None, as_json: bool) -> None:
    """Generate with the routed engine: each token's FFN runs only the groups near its vertex."""
    from .eval.routed import routed_generate

    _require_file(model)
    r = routed_generate(model, prompt, n_tokens, radius, temperature=temperature, top_k=top_k, seed=seed,
                        n_threads=threads, device=device)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(prompt + r["text"])
    _log(f"{r['backend']}, radius {radius if radius is not None else 'all (dense)'}: "
         f"prompt {r['prompt_tokens_per_s']:.1f} t/s, generation {r['gen_tokens_per_s']:.1f} t/s")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("text")
@click.option("--top", type=int, default=3, show_default=True, help="Nearest concepts shown per layer.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def concepts(model: Path, text: str, top: int, as_json: bool) -> None:
    """The vertex TEXT routes to in each layer of MODEL, and the nearest concepts of its map."""
    from .hypercube.routes import text_routes

    _require_file(model)
    r = text_routes(model, text, top)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    d = r["dim"]
    click.echo(f"{r['tokens']} tokens, Q_{d}" + (f", concept map read at layer {r['concept_layer']}"
                                                  if r["concept_layer"] is not None else ", no concept map"))
    for e in r["layers"]:
        near = ", ".join(f"{n['concept']} (hamming {n['hamming']})" for n in e.get("nearest", []))
        mark = " *" if e["layer"] == r["concept_layer"] else ""
        click.echo(f"layer {e['layer']:>2}{mark}: vertex {e['vertex']:>4} ({e['vertex']:0{d}b})" + (f"  nearest: {near}" if near else ""))


@main.group()
def engine() -> None:
    """The C++ routed-inference engine (cpp/), built against llama-cpp-python's ggml."""


@engine.command()
@_fail_cleanly
def build() -> None:
    """Build (or find the cached build of) the engine library and print its path."""
    from .engine.build import library_path

    click.echo(str(library_path(log=_log)))


@main.command()
@click.option("--corpus", "corpus", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Text file or directory of .txt files (repeatable).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output checkpoint directory.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)),
              default=None, help="Model shape; --n-layer/--n-embd/--n-head/--ctx override it.")
@click.option("--n-layer", type=int, default=None)
@click.option("--n-embd", type=int, default=None)
@click.option("--n-head", type=int, default=None)
@click.option("--ctx", type=int, default=None, help="Context length (n_positions) and training window.")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Training tokens in all.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Windows per optimizer step, in all processes together (the global batch).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option("--eval-every", type=int, default=100, show_default=True, help="Steps between held-out evaluations (and checkpoints).")
@click.option("--holdout", multiple=True, type=click.Path(path_type=Path),
              help="Corpus file to hold out for evaluation (repeatable; by file name).")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help=PRECISION_HELP)
@click.option("--stop-at", type=int, default=None,
              help="Stop (resumably) after this step; the learning-rate schedule still spans --tokens.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt exactly.")
@click.option("--pos", type=click.Choice(list(POSITIONS)), default="learned", show_default=True,
              help="Position scheme: " + "; ".join(f"{p.name}: {p.summary}" + (
                  f" (llama.cpp: {p.llama_arch})" if p.llama_arch else " (PyTorch only)") for p in POSITIONS.values()))
@click.option("--rope-fraction", type=float, default=None, help="rope/rope-spread: share of each head's dimensions "
              "that rotate (rounded down to even) [default: 1].")
@click.option("--rope-base", type=float, default=None, help="rope/rope-spread: frequency base [default: 10000].")
@click.option("--rotating-freqs", type=click.Choice(list(ROTATING_FREQS)), default=None,
              help="rotating: lr (learned H x D/2 frequencies per layer, N(0,1) init) or gp (fixed "
                   "10^(-h/(H-1)) 10000^(-2i/D)) [default: lr].")
@click.option("--rotating-norm", is_flag=True, help="rotating: a LayerNorm over each head's frequencies.")
@click.option("--parallel", "parallel_paths", type=click.Choice(list(PARALLEL_PATHS)), is_flag=False,
              flag_value="mean", default=None,
              help="Parallel paths (the seed's parallel GPT-2): stage k runs blocks 2k and 2k+1 on the same input "
                   "and merges them by mean [the value without one], add, or concat (one shared Linear 2E -> E); "
                   "n_layer even; PyTorch only.")
@click.option("--parallel-residual", is_flag=True, help="Parallel residual blocks: x + attn(ln(x)) + mlp(ln(x)) from "
              "one LayerNorm (GPT-J; llama.cpp runs them with --pos rope, as gptneox).")
@click.option("--attention", type=click.Choice(list(ATTENTIONS)), default="full", show_default=True,
              help="; ".join(f"{a.name}: {a.summary}" + (" (PyTorch only)" if a.why_not else "")
                             for a in ATTENTIONS.values()))
@click.option("--linformer-block", type=int, default=None, help="linformer: keys per compressed block [default: 32].")
@click.option("--linformer-k", type=int, default=None,
              help="linformer: learned mixtures each earlier block is projected to [default: 8].")
@click.option("--duo-predict", is_flag=True, help="Duo-predict (the seed's): a <|MASK|> token after every real token, "
              "sharing its position; masks see the tokens around the one they stand for; one loss over both "
              "(see --duo-loss). The real tokens alone are the causal LM that converts (vocabulary + 1).")
@click.option("--duo-loss", type=click.Choice(list(DUO_LOSSES)), default=None,
              help="duo-predict: intended (real x_k -> x_{k+1}, mask M_k -> x_k) or original (the seed's committed "
                   "loss: x_k -> x_k, M_k -> x_{k+2}) [default: intended].")
@click.option("--alternate-direction", is_flag=True, help="Train reading left to right and right to left in "
              "alternation (the window reversed for every other sequence), a learned direction embedding saying "
              "which; evaluated and generated left to right (PyTorch only).")
@click.option("--drift-diffusion", "drift_diffusion", is_flag=False, flag_value="drift,diffusion,baseline",
              default=None, metavar="[PARTS]",
              help="Drift-diffusion (the seed's) on each head's attention output before c_proj: learned H x D drift d, "
                   "baseline beta, diffusion s; a' = a + sigmoid(d)(a - beta), + s * N(0,1) in training only. "
                   "PARTS: a comma list of drift, diffusion, baseline [all three without a value]. Converts "
                   "(the drift folds into attn_output).")
@click.option("--residual-diffusion", type=float, default=0.0, show_default=True, metavar="SIGMA",
              help="Train the residual stream as a drift-diffusion path: after each of the L blocks add Gaussian "
                   "noise of std SIGMA * rms(x) / sqrt(L) (training only; the file is the drift path, which "
                   "converts as its --pos does). 0: off.")
@_distributed_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@_fail_cleanly
def train(corpus, out, preset, n_layer, n_embd, n_head, ctx, tokens, batch_size, lr, warmup_steps, eval_every,
          holdout, seed, device, threads, precision, stop_at, resume, pos, rope_fraction, rope_base, rotating_freqs,
          rotating_norm, parallel_paths, parallel_residual, attention, linformer_block, linformer_k, duo_predict,
          duo_loss, alternate_direction, drift_diffusion, residual_diffusion, micro_batch, fsdp, dist_timeout,
          quiet, as_json) -> None:
    """Train a GPT-2 (or a variant: --pos, --parallel, --parallel-residual, --attention, --duo-predict,
    --alternate-direction, --drift-diffusion, --residual-diffusion)
    from scratch and write a Hugging Face-style checkpoint. Plain GPT-2 is transformers'
    GPT2LMHeadModel; variants are gpt2cube's own torch model with GPT-2's tensor names, which
    `convert` writes to the llama.cpp architecture that computes them exactly (sinusoidal: gpt2,
    rope: gptneox, alibi/none: mpt) or refuses with the reason, and `eval perplexity` scores in
    PyTorch."""
    from dataclasses import asdict

    from .train.trainer import TrainConfig
    from .train.trainer import train as run_train
    from .variants.spec import VariantSpec

    options = {k: v for k, v in (("rope_fraction", rope_fraction), ("rope_base", rope_base),
                                 ("linformer_block", linformer_block), ("linformer_k", linformer_k),
                                 ("rotating_freqs", rotating_freqs), ("duo_loss", duo_loss),
                                 ("parallel_paths", parallel_paths), ("drift_diffusion", drift_diffusion))
               if v is not None}
    spec = VariantSpec(pos=pos, parallel_residual=parallel_residual, attention=attention, duo_predict=duo_predict,
                       alternate_direction=alternate_direction, residual_diffusion=residual_diffusion,
                       rotating_norm=rotating_norm, **options)
    variant = {} if spec.is_plain_gpt2 else asdict(spec)

    shape = dict(zip(("n_layer", "n_embd", "n_head", "ctx"), PRESETS[preset or "reference"]))
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("ctx", ctx)):
        if value is not None:
            if value <= 0:
                raise click.BadParameter(f"{value}; expected a positive integer", param_hint=f"--{key.replace('_', '-')}")
            shape[key] = value
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(corpus=[str(c) for c in corpus], out=str(out), tokens=tokens, batch_size=batch_size, lr=lr,
                      warmup_steps=warmup_steps, eval_every=eval_every, holdout=[str(h) for h in holdout],
                      seed=seed, device=device, precision=precision, stop_at=stop_at, variant=variant,
                      micro_batch=micro_batch, fsdp=fsdp, dist_timeout=dist_timeout, **shape)
    summary = run_train(cfg, resume=resume, progress=not quiet, log=_log)
    if _rank0():
        click.echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {out}: {summary['step']} steps, {summary['tokens']:,} tokens, "
               f"held-out ppl {summary.get('val_ppl')}")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output checkpoint directory (Hugging Face layout, fp32; `convert` takes it).")
@click.option("--task", type=click.Choice(list(FT_TASKS)), default="lm", show_default=True,
              help="lm: language modelling on --corpus; spam: SMS spam as prompt + message -> label word on --data.")
@click.option("--corpus", multiple=True, type=click.Path(path_type=Path),
              help="lm: text file or directory of .txt files (repeatable).")
@click.option("--holdout", multiple=True, type=click.Path(path_type=Path),
              help="lm: corpus file held out as validation text (repeatable, by name) [default: the corpus' last 5 %].")
@click.option("--exclude", multiple=True, type=click.Path(path_type=Path),
              help="lm: corpus file used for neither training nor validation (repeatable, by name): the text you "
                   "will evaluate on.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="spam: SMSSpamCollection (ham|spam<TAB>text).")
@click.option("--split", "split_name", type=click.Choice(sorted(SPAM_SPLITS)), default="stratified", show_default=True,
              help="spam: the deduplicated split whose training part is trained on (as `eval spam --split`).")
@click.option("--qat", type=click.Choice(sorted(QUANT_TYPES)), default=None,
              help="Quantization-aware training for this --type: the forward pass uses exactly the values "
                   "`convert --type` stores (straight-through gradients, latent fp32 weights saved).")
@click.option("--embed-type", type=click.Choice(sorted(QUANT_TYPES)), default=None,
              help="As convert's --embed-type [default: q8_0 for ternary --qat, else --qat].")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None, help="As convert's --recipe.")
@click.option("--ternary-scale", type=click.Choice(TERNARY_SCALES + FITTED_TERNARY_SCALES), default=None,
              help="As convert's --ternary-scale [default: row-fit with --init gptq, a --init file's own rule, "
                   "else tensor].")
@click.option("--strict", is_flag=True, help="As convert's --strict: no row-length fallbacks.")
@click.option("--init", default=None, metavar="gptq|FILE.gguf",
              help="With --qat: start from the values a calibrated conversion stores instead of rounding the "
                   "checkpoint to nearest. gptq: GPTQ (act-order) on --calib now; FILE.gguf: a file converted from "
                   "this checkpoint with the same types (e.g. convert --method gptq --imatrix).")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="--init gptq: calibration text (UTF-8).")
@click.option("--calib-tokens", type=int, default=16_384, show_default=True, help="--init gptq: calibration tokens.")
@click.option("--calib-ctx", type=int, default=None, help="--init gptq: calibration window [default: min(512, n_ctx)].")
@click.option("--qat-warmup", type=int, default=0, show_default=True,
              help="Steps over which the quantized weights are blended in (lambda 0 -> 1); 0 switches at once.")
@click.option("--routed", type=click.Path(path_type=Path), default=None,
              help="Routing-aware fine-tuning: a hypercube GGUF of this checkpoint (convert --hypercube-dim); its routers "
                   "and groups mask every FFN in the forward pass, as the routed engine computes it. Convert the result "
                   "with --hypercube-from the same file.")
@click.option("--radius", type=int, default=None,
              help="With --routed: the ball radius trained for [default: the radius the file's router was fitted for].")
@click.option("--freeze-embeddings/--train-embeddings", default=None,
              help="Keep token/position embeddings fixed [default: frozen under --qat with --task lm, "
                   "trained otherwise (spam: fake-quantized every step, a better classifier)].")
@click.option("--lm-weight", type=float, default=None,
              help="spam: share of next-token loss on the messages' own text, (1 - w) * label CE + w * LM CE "
                   "[default: 0.5; 0 trains the label alone].")
@click.option("--distill", type=click.Path(path_type=Path), default=None,
              help="Teacher checkpoint (same vocabulary, at least the context): KL distillation from its logits.")
@click.option("--distill-weight", type=float, default=0.5, show_default=True,
              help="Share of the distillation loss: (1 - w) * CE + w * KL.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature.")
@click.option("--tokens", type=int, default=None, help="Fine-tuning tokens [default: lm 2,000,000; spam 900,000].")
@click.option("--batch-size", type=int, default=None, help="Items per optimizer step, in all processes together (the global batch) "
              "[default: lm 8 windows; spam 16 messages].")
@click.option("--ctx", type=int, default=None, help="lm window [default: min(512, the model's positions)].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: lm 5e-4; spam 1e-3].")
@click.option("--warmup-steps", type=int, default=None, help="Learning-rate warm-up steps [default: 20].")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--dropout", type=float, default=None,
              help="Dropout while fine-tuning, in place of the checkpoint's rates (its config.json is kept) "
                   "[default: lm 0; spam 0.1].")
@click.option("--eval-every", type=int, default=None, help="Steps between validations and checkpoints [default: 50].")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help=PRECISION_HELP)
@click.option("--stop-at", type=int, default=None, help="Stop (resumably) after this step.")
@click.option("--resume", is_flag=True, help="Continue OUT exactly (same settings).")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in OUT.")
@_distributed_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@_fail_cleanly
def finetune(src, out, task, corpus, holdout, exclude, data, split_name, qat, embed_type, recipe_file, ternary_scale, strict,
             init, calib, calib_tokens, calib_ctx, qat_warmup, routed, radius, freeze_embeddings, lm_weight, distill, distill_weight, temperature, tokens, batch_size, ctx, lr,
             warmup_steps, weight_decay, dropout, eval_every, seed, device, threads, precision, stop_at, resume, force,
             micro_batch, fsdp, dist_timeout, quiet, as_json) -> None:
    """Fine-tune the GPT-2 checkpoint SRC: recover a compressed model's quality (QAT, distillation)
    or teach it a task, and write a checkpoint that `convert` takes.

    The best validation step is what OUT holds; with --qat, validation runs on the quantized
    values, so its figures are those of the converted file."""
    from .converter.plan import load_recipe_file
    from .finetune.loop import FinetuneConfig
    from .finetune.loop import finetune as run_finetune

    if threads:
        import torch

        torch.set_num_threads(threads)
    patterns = load_recipe_file(recipe_file) if recipe_file else []
    if patterns and not qat:
        raise click.BadParameter("a recipe only applies with --qat", param_hint="--recipe")
    cfg = FinetuneConfig(src=str(src), out=str(out), task=task, corpus=[str(c) for c in corpus],
                         holdout=[str(h) for h in holdout], exclude=[str(e) for e in exclude], data=str(data) if data else None, split=split_name,
                         qat=qat, embed_type=embed_type, recipe=patterns, ternary_scale=ternary_scale, strict=strict,
                         init=init, calib=str(calib) if calib else None, calib_tokens=calib_tokens, calib_ctx=calib_ctx,
                         qat_warmup=qat_warmup, routed=str(routed) if routed else None, radius=radius,
                         freeze_embeddings=freeze_embeddings, lm_weight=lm_weight,
                         distill=str(distill) if distill else None, distill_weight=distill_weight,
                         temperature=temperature, tokens=tokens, batch_size=batch_size, ctx=ctx, lr=lr,
                         warmup_steps=warmup_steps, weight_decay=weight_decay, dropout=dropout, eval_every=eval_every, seed=seed,
                         device=device, precision=precision, stop_at=stop_at, micro_batch=micro_batch, fsdp=fsdp,
                         dist_timeout=dist_timeout)
    summary = run_finetune(cfg, resume=resume, force=force, progress=not quiet, log=_log)
    if not _rank0():
        return
    best = summary["best"]
    click.echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {out}: {summary['steps']} steps, {summary['tokens']:,} tokens; best at step {best['step']}: "
               + ", ".join(f"{k} {v}" for k, v in best.items() if k.startswith("val_"))
               + (f"\nnext: {summary['convert']}" if "convert" in summary else ""))


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the pruned checkpoint.")
@click.option("--ffn", type=float, default=None,
              help="FFN neurons removed from every layer: a fraction below 1 (0.25) or a count (256).")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Take --ffn, --importance, --multiple-of, --calib-tokens, --seed from the file's [prune] table "
                   "(options given here win); e.g. recipes/gpt2-124m-63mb.toml.")
@click.option("--importance", type=click.Choice(["activation", "taylor", "magnitude", "random"]), default="activation",
              show_default=True, help="activation: E[(a - c)^2] ||W_down row||^2; taylor: |sum (a - c) dL/da|; "
                                      "magnitude: ||W_up col|| ||W_down row||; random: seeded.")
@click.option("--calib", multiple=True, type=click.Path(path_type=Path),
              help="Calibration text: files or directories of .txt (repeatable).")
@click.option("--calib-tokens", type=int, default=65_536, show_default=True, help="Tokens of calibration text.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Calibration window.")
@click.option("--multiple-of", type=int, default=32, show_default=True,
              help="Round the kept width down to a multiple of this (256 keeps ffn_down in K-quants).")
@click.option("--no-bias-compensation", is_flag=True,
              help="Do not fold the removed neurons' mean output into c_proj's bias (FLAP).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace a checkpoint already in OUT.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
@click.pass_context
def prune(cctx, src, out, ffn, recipe_file, importance, calib, calib_tokens, ctx, multiple_of, no_bias_compensation,
          seed, force, as_json) -> None:
    """Remove the least important FFN neurons of the GPT-2 checkpoint SRC, the same number in
    every layer, and write a Hugging Face checkpoint (smaller n_inner) that `convert` and
    `finetune --distill SRC` take.

    One width for every layer because llama.cpp's GPT-2 graph sizes every layer's FFN by one
    feed_forward_length. Attention heads are not offered: that graph keeps attn_qkv and
    attn_output n_embd wide whatever the head count, so a pruned head could only be stored as
    zeros (no smaller file, no faster run)."""
    from .prune import PruneConfig
    from .prune import prune as run_prune
    from .prune.recipe import load_prune_recipe

    if recipe_file is not None:
        given = {k for k in ("ffn", "importance", "multiple_of", "calib_tokens", "seed")
                 if cctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        for key, value in load_prune_recipe(recipe_file).items():
            if key not in given:
                cctx.params[key] = value
        ffn, importance, multiple_of = cctx.params["ffn"], cctx.params["importance"], cctx.params["multiple_of"]
        calib_tokens, seed = cctx.params["calib_tokens"], cctx.params["seed"]
    if ffn is None:
        raise InputError("--ffn is required (a fraction below 1 or a count of neurons), or --recipe FILE with [prune] ffn")
    cfg = PruneConfig(src=str(src), out=str(out), ffn=ffn, importance=importance, calib=[str(c) for c in calib],
                      calib_tokens=calib_tokens, ctx=ctx, multiple_of=multiple_of, compensate=not no_bias_compensation,
                      seed=seed)
    summary = run_prune(cfg, force=force, log=_log)
    click.echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {out}: {summary['kept_per_layer']} of {summary['n_ff']} FFN neurons kept per layer; share of "
               f"importance removed per layer: {', '.join(f'{v:.3f}' for v in summary['removed_share_of_importance'])}"
               f"\nnext: gpt2cube convert {out} -o pruned.gguf --type q4_k  (or finetune {out} --distill {src})")


def _sampling_options(f):
    for opt in reversed([
        click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=40, show_default=True, help="0 = all tokens."),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.1, show_default=True, help="1 = off."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--max-tokens", type=int, default=128, show_default=True, help="Longest reply."),
    ]):
        f = opt(f)
    return f


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@_sampling_options
@click.option("--engine", type=click.Choice(["llama.cpp", "routed"]), default="llama.cpp", show_default=True,
              help="Stock llama.cpp, or gpt2cube's routed engine for hypercube files.")
@click.option("--radius", type=int, default=None, help="Routed engine: Hamming radius of the FFN groups [default: dense].")
@click.option("--vertices", "show_vertices", is_flag=True, help="Routed engine: show each reply token's vertices.")
@click.option("--device", default="cpu", show_default=True, help="Routed engine: cpu, auto or a ggml device.")
@click.option("--ctx", type=int, default=None, help="Context window [default: the model's].")
@click.option("--format", "fmt", type=click.Choice(["transcript", "dialogpt"]), default="transcript", show_default=True,
              help="transcript: 'User: / Assistant:' lines after an opening line; dialogpt: turns separated by "
                   "<|endoftext|> (DialoGPT checkpoints).")
@click.option("--system", default=None, help="The transcript's opening line.")
@click.option("--threads", type=int, default=None)
@_fail_cleanly
def chat(model, temperature, top_k, top_p, repeat_penalty, seed, max_tokens, engine, radius, show_vertices, device,
         ctx, fmt, system, threads) -> None:
    """Chat with MODEL in the terminal: replies stream as they are generated, the history is kept
    within the context (oldest turns dropped, and said so). /reset, /stats, /vertices, /quit."""
    from .chat.backends import open_backend
    from .chat.conversation import Conversation
    from .chat.sampling import Sampling
    from .chat.terminal import chat_loop

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty, seed=seed,
                        max_tokens=max_tokens)
    conv = Conversation(fmt=fmt, **({"system": system} if system is not None else {}))
    backend = open_backend(model, engine, radius=radius, n_ctx=ctx, n_threads=threads, device=device)
    try:
        if sampling.max_tokens >= backend.n_ctx - 8:
            raise InputError(f"--max-tokens {max_tokens} leaves no room for the prompt in the {backend.n_ctx}-token context")
        interactive = sys.stdin.isatty()
        chat_loop(backend, conv, sampling, read=(lambda: input("you: ")) if interactive else _stdin_line,
                  show_vertices=show_vertices)
    finally:
        backend.close()


def _stdin_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--allow-remote", is_flag=True, help="Needed to bind to an address other than loopback.")
@click.option("--memory-budget", "budget_mb", type=float, default=2048, show_default=True,
              help="MB that loaded models may take (file + KV cache + buffers); least recently used ones are unloaded.")
@click.option("--queue", "queue_limit", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Requests that may wait per model; more get HTTP 429.")
@click.option("--ctx", type=int, default=1024, show_default=True, help="Context window per model (at most the model's).")
@click.option("--threads", type=int, default=None)
@_fail_cleanly
def serve(models, host, port, allow_remote, budget_mb, queue_limit, ctx, threads) -> None:
    """A local web page and an OpenAI-compatible API (/v1/completions, /v1/chat/completions, with
    streaming) over MODELS; the page shows each model's type, size and bits per weight and can send
    one prompt to two models side by side."""
    import ipaddress
    import socket

    from .chat.pool import ModelPool
    from .chat.server import create_app

    try:
        addrs = {ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, None)}
    except (socket.gaierror, ValueError) as e:
        raise InputError(f"--host {host}: cannot resolve it ({e})") from None
    if not all(a.is_loopback for a in addrs) and not allow_remote:
        raise InputError(f"--host {host} is not a loopback address; other machines could reach the server. "
                         "Pass --allow-remote to bind there anyway")
    if budget_mb <= 0:
        raise InputError(f"--memory-budget {budget_mb}; expected a positive number of MB")
    pool = ModelPool(list(models), budget_bytes=int(budget_mb * 1e6), queue_limit=queue_limit, n_ctx=ctx,
                     n_threads=threads)
    for name, e in pool.entries.items():
        _log(f"{name}: {e.path}" + (f" (unavailable: {e.reason})" if e.reason else
                                    f" ({e.info['type']}, {e.info['size_mb']} MB, about {e.est_bytes / 1e6:.0f} MB loaded)"))
    import uvicorn

    _log(f"serving on http://{host}:{port}/ (budget {budget_mb:.0f} MB)")
    uvicorn.run(create_app(pool), host=host, port=port, log_level="warning")


@main.group()
def baseline() -> None:
    """Baselines measured on the same GPT-2 token stream as the models."""


@baseline.command()
@click.option("--order", type=click.IntRange(1, 5), required=True, help="N of the n-gram model.")
@click.option("--train", "train_paths", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Training text file or directory of .txt files (repeatable).")
@click.option("--test", "test_path", required=True, type=click.Path(path_type=Path), help="Text to score.")
@click.option("--exclude", multiple=True, help="File name among --train to leave out (repeatable), e.g. held-out books.")
@click.option("--method", type=click.Choice(list(NGRAM_METHODS)), default="mkn", show_default=True,
              help="mkn: modified Kneser-Ney (three discounts per order, as KenLM's lmplz); kn: interpolated "
                   "Kneser-Ney with one discount; backoff: absolute-discount backoff.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Perplexity window, as in eval perplexity.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def ngram(order: int, train_paths, test_path: Path, exclude, method: str, ctx: int, as_json: bool) -> None:
    """N-gram perplexity on the GPT-2 token stream, same definition as `eval perplexity`."""
    import time

    from .eval.perplexity import read_text
    from .tokenizers import encode_text, hf_tokenizer
    from .train.data import corpus_files, load_tokens, split_holdout
    from .train.ngram import NGramModel, ngram_perplexity

    files, _ = split_holdout(corpus_files([Path(p) for p in train_paths]), [Path(e) for e in exclude])
    t0 = time.perf_counter()
    tokens = load_tokens(files)
    model = NGramModel(order, method).fit(tokens)
    fit_s = time.perf_counter() - t0
    test_tokens = encode_text(hf_tokenizer(), read_text(test_path))
    r = ngram_perplexity(model, test_tokens, ctx)
    out = {**r.as_json(), "order": order, "method": method, "train_tokens": int(len(tokens)), "fit_seconds": round(fit_s, 2)}
    click.echo(json.dumps(out, indent=2) if as_json else
               f"{r.engine}: PPL = {r.ppl:.3f} +/- {r.ppl_stderr:.4f} over {r.tokens_scored} tokens "
               f"(trained on {len(tokens):,} tokens in {fit_s:.1f} s)")


@baseline.command()
@click.option("--model", "kind", type=click.Choice(NEURAL_KINDS), required=True,
              help="ffnn: Bengio et al.'s feed-forward n-gram network; rnn: Elman (tanh) RNN; lstm: LSTM.")
@click.option("--train", "train_paths", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Training text file or directory of .txt files (repeatable).")
@click.option("--test", "test_path", required=True, type=click.Path(path_type=Path), help="Text to score.")
@click.option("--exclude", multiple=True, help="File name among --train to leave out (repeatable), e.g. held-out books.")
@click.option("--holdout", multiple=True, type=click.Path(path_type=Path),
              help="File among --train held out as validation text (repeatable, by name) [default: the last 5 %].")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Checkpoint directory (resumable; `eval perplexity OUT` scores it again).")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Training tokens in all.")
@click.option("--ctx", type=int, default=512, show_default=True,
              help="Training window and perplexity window, as in eval perplexity.")
@click.option("--n-embd", type=int, default=256, show_default=True, help="Embedding size (tied output layer).")
@click.option("--hidden", type=int, default=512, show_default=True, help="Hidden units.")
@click.option("--layers", type=int, default=1, show_default=True, help="rnn/lstm: stacked layers.")
@click.option("--order", type=int, default=5, show_default=True, help="ffnn: n of the n-gram (n - 1 tokens of history).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--resume", is_flag=True, help="Continue OUT's training exactly.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True)
@_fail_cleanly
def neural(kind, train_paths, test_path, exclude, holdout, out, tokens, ctx, n_embd, hidden, layers, order, batch_size, lr,
           warmup_steps, seed, device, threads, resume, quiet, as_json) -> None:
    """Train a pre-transformer neural LM on the GPT-2 token stream (the trainer of `train`: AdamW,
    cosine schedule, resumable) and score --test with the windows of `eval perplexity`."""
    from .eval.perplexity import hf_perplexity, read_text
    from .train.data import corpus_files, split_holdout
    from .train.trainer import TrainConfig
    from .train.trainer import train as run_train
    from .variants.neural import NeuralConfig

    text = read_text(test_path)
    spec = NeuralConfig(kind=kind, n_embd=n_embd, n_hidden=hidden, n_layer=layers, order=order, n_positions=ctx)
    files, _ = split_holdout(corpus_files([Path(p) for p in train_paths]), [Path(e) for e in exclude])
    if threads:
        import torch

        torch.set_num_threads(threads)
    neural_fields = {k: v for k, v in spec.to_json().items() if k in ("kind", "n_embd", "n_hidden", "n_layer", "order")}
    cfg = TrainConfig(corpus=[str(f) for f in files], out=str(out), ctx=ctx, tokens=tokens, batch_size=batch_size,
                      lr=lr, warmup_steps=warmup_steps, seed=seed, device=device, holdout=[str(h) for h in holdout], neural=neural_fields)
    summary = run_train(cfg, resume=resume, progress=not quiet, log=_log)
    r = hf_perplexity(out, text, ctx, progress=not quiet)
    result = {**r.as_json(), "model": kind, "parameters": summary["parameters"], "train_tokens": summary["tokens"],
              "train_tokens_per_s": summary["tokens_per_s"], "train_seconds": summary["seconds"],
              "val_ppl": summary.get("val_ppl"), "out": str(out)}
    click.echo(json.dumps(result, indent=2) if as_json else
               f"{kind}: PPL = {r.ppl:.3f} +/- {r.ppl_stderr:.4f} over {r.tokens_scored} tokens "
               f"({summary['parameters']:,} parameters, {summary['tokens']:,} training tokens)")


@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="HF checkpoint [default: models/reference, or a random GPT-2 when absent].")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to keep the GGUF files (default: a temporary directory).")
@click.option("--full", is_flag=True,
              help="The table of record: 40 perplexity windows per type, 5 timed bench runs (about 10 minutes "
                   "on 2 cores) instead of 10 windows and 2 runs.")
@click.option("--max-windows", type=int, default=None, help="Perplexity windows of 512 per type [default: 10, 40 with --full].")
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
@_fail_cleanly
def demo(model: Path | None, workdir: Path | None, full: bool, max_windows: int | None, as_json: bool) -> None:
    """The main job: convert the reference model to every type, run each in llama.cpp, one table;
    then the hypercube file in stock llama.cpp and in the routed engine at each radius."""
    from .demo import format_table, run_demo, run_routed_demo

    windows = max_windows or (40 if full else 10)
    rows = run_demo(workdir, log=_log, model=model, max_windows=windows, bench_repeats=5 if full else 2)
    if not as_json:  # the first table as soon as it is ready
        click.echo(f"Every type, run by llama.cpp ({windows} held-out windows of 512 tokens"
                   f"{'' if full else '; --full for the table of record'}):\n")
        click.echo(format_table(rows))
    routed = run_routed_demo(workdir, log=_log, model=model, max_windows=windows)
    if as_json:
        click.echo(json.dumps({"types": rows, "routed": routed}, indent=2))
        return
    if routed:
        click.echo("\nHypercube (Q_2 over each FFN) and the routed engine, same held-out windows:\n")
        click.echo(format_table(routed))


if __name__ == "__main__":
    main()
