"""Write TRAINING.md for a checkpoint trained by `gpt2cube train`: command, corpus sha256,
tokens seen, wall time, hardware, held-out perplexity, loss curve and samples from fixed prompts
(greedy-free sampling with a fixed seed, run by llama.cpp on the f16 conversion).

    python scripts/training_report.py RUN_DIR --command "gpt2cube train ..." [--out TRAINING.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

from gpt2cube.converter import convert
from gpt2cube.eval.generate import DEFAULT_PROMPTS, generate


def corpus_digest(files: list[Path]) -> tuple[str, list[tuple[str, str]]]:
    rows = sorted((f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files)
    digest = hashlib.sha256("".join(f"{n} {h}\n" for n, h in rows).encode()).hexdigest()
    return digest, rows


def plot_loss_until(run: Path, rows: list[dict]) -> None:
    """loss_curve.png of the rows up to the checkpoint (the run may have gone on)."""
    from gpt2cube.train.trainer import plot_loss

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "train_log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot_loss(log, run / "loss_curve.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--command", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from gpt2cube.train.data import corpus_files, split_holdout

    state = torch.load(args.run / "train_state.pt", map_location="cpu", weights_only=False)
    cfg = state["config"]
    rows = [json.loads(x) for x in (args.run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["step"] <= state["step"]]  # the log may run past the last checkpoint
    evals = [r for r in rows if "val_loss" in r]
    planned = cfg["tokens"] // (cfg["batch_size"] * cfg["ctx"])
    shown = [r for i, r in enumerate(evals) if i % max(1, len(evals) // 12) == 0 or r is evals[-1]]
    train_files, held = split_holdout(corpus_files([Path(c) for c in cfg["corpus"]]), [Path(h) for h in cfg["holdout"]])
    digest, per_file = corpus_digest(train_files)
    held_digest, _ = corpus_digest(held)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "m.gguf"
        convert(args.run, f16, "f16", progress=False, log=lambda m: None)
        samples = [(p, generate(f16, p, n_tokens=60, temperature=0.8, seed=i)) for i, p in enumerate(DEFAULT_PROMPTS)]
    last = rows[-1]
    plot_loss_until(args.run, rows)
    n_params = sum(t.numel() for k, t in state["model"].items() if k != "lm_head.weight")
    lines = [
        "# Reference GPT-2: how it was trained",
        "",
        f"GPT-2 architecture, {cfg['n_layer']} layers x {cfg['n_embd']} (head size {cfg['n_embd'] // cfg['n_head']}, "
        f"{cfg['n_head']} heads), context {cfg['ctx']}, GPT-2 BPE vocabulary (50257), tied output head, "
        f"{n_params / 1e6:.2f} M parameters, stored as fp16 safetensors "
        f"({(args.run / 'model.safetensors').stat().st_size / 1e6:.1f} MB). Trained from scratch by `gpt2cube train`.",
        "",
        "## Command",
        "",
        "```bash",
        args.command,
        "```",
        "",
        "## Data",
        "",
        f"- Training corpus: {len(train_files)} Project Gutenberg books from `../shared/data/gutenberg/books` "
        f"({sum(f.stat().st_size for f in train_files):,} bytes), tokenised with GPT-2's BPE",
        f"- Corpus sha256 (sha256 over the sorted lines `name sha256` of the training files): `{digest}`",
        f"- Held out (never trained on): {', '.join(f.name for f in held)}, sha256 of their list `{held_digest}`",
        "",
        "## Run",
        "",
        f"- Steps: {state['step']} of batch {cfg['batch_size']} x {cfg['ctx']} tokens; tokens seen: "
        f"{state['tokens_seen']:,}" + ("" if state["step"] >= planned else
                                      f" — a checkpoint of a run planned for {planned} steps ({cfg['tokens']:,} tokens), "
                                      "taken while the learning rate was still "
                                      f"{rows[-1]['lr'] / cfg['lr'] * 100:.0f} % of its peak; `--resume` continues it exactly"),
        f"- Precision: {cfg.get('precision', 'fp32')} (bf16 autocast keeps fp32 master weights and optimizer state)",
        f"- Optimiser: AdamW (betas 0.9/0.95, weight decay {cfg['weight_decay']} on matrices), peak lr {cfg['lr']}, "
        f"{cfg['warmup_steps']} warm-up steps then cosine to 10 %, gradient clipping 1.0, no dropout, seed {cfg['seed']}",
        f"- Wall time: {state['seconds'] / 60:.1f} min of training ({last.get('tokens_per_s')} tokens/s on average; "
        "the run shared the CPU with other work part of the time)",
        f"- Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} on CPU ({platform.platform()})",
        f"- Final held-out loss {evals[-1]['val_loss']} nats, perplexity {evals[-1]['val_ppl']} "
        f"(transformers, {cfg['eval_batches']} batches of {cfg['batch_size']} evenly spaced windows of {cfg['ctx']}, "
        "every position scored). `gpt2cube eval perplexity` and `benchmarks/progression.py` give llama.cpp's "
        "figures (second half of each window scored).",
        "",
        "| step | tokens | train loss | held-out loss | held-out ppl |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {r['step']} | {r['tokens']:,} | {r['loss']} | {r['val_loss']} | {r['val_ppl']} |" for r in shown],
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Samples (llama.cpp, f16 file, temperature 0.8, top-k 40, seed = prompt index)",
        "",
    ]
    for p, s in samples:
        lines += [f"> **{p}**{s.replace(chr(10), ' ')}", ""]
    out = args.out or args.run / "TRAINING.md"
    out.write_text("\n".join(lines))
    print(out)


if __name__ == "__main__":
    main()
