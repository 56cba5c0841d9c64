"""What routing half (or a third) of the FFN costs in held-out perplexity, per router, with the
baselines that show what the hypercube structure itself costs or buys.

    python benchmarks/routing_quality.py [--model models/reference] [--dims 3 4] [--radius 1]
        [--max-windows 40] [--calib-tokens 16384] [--finetune-tokens 409600] [--no-finetune]
        [--workdir /tmp/gpt2cube-routing] [--resume]

Calibration: --calib-tokens of pg11 (a training book). Held out: The Time Machine (pg35), windows
of 512 with the second half scored (llama.cpp's definition). Every row computes the FFN groups of
its choice for each token and skips the rest; "+ comp" rows add the skipped neurons' calibration
mean output back (per vertex for the hypercube, the all-token mean for the baselines).

PyTorch rows (the same windows, PPL relative to PyTorch's dense run of the model):
  pca, no comp     -- the PCA router as shipped before the learned one (schema 1 files)
  pca + comp       -- the same router with the per-vertex compensation
  random + comp    -- d random hyperplanes through the median, groups assigned as for PCA
  static hot + comp -- the same B/V share of neurons for every token, those of highest mean
                       |a - mean| ||W_down row|| (PowerInfer's "hot neurons")
  top-k linear + comp -- the learned groups, the B groups a least-squares predictor of each
                       group's mass ranks highest (a learned router ignoring the hypercube)
  top-k oracle + comp -- the B groups of truly largest mass (needs the activations: a bound)
  learned + comp   -- the learned hypercube router (the default of convert --hypercube-dim)
  learned + routed FT -- after finetune --routed (distillation from the dense model,
                       --finetune-tokens of the training books)
Engine rows (the hypercube files themselves, PPL relative to llama.cpp's dense run of the same
file): the learned file, and the fine-tuned one converted with --hypercube-from; plus, for the
fine-tuned one, the dense control (the reference fine-tuned with the same recipe, unrouted).
Prints JSON and a table; writes WORKDIR/routing_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BOOKS = DATA / "gutenberg" / "books"
VALIDATION = ["pg1661.txt", "pg768.txt", "pg1952.txt"]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import print_report  # noqa: E402


class Masked:
    """Hooks every FFN of a transformers GPT-2: choose(layer, x (n, E), a (n, F)) -> (keep (n, F)
    0/1 over the checkpoint's neurons, add (n, E) or None)."""

    def __init__(self, model, choose) -> None:
        self.x, self.add = {}, {}
        self.hooks = []
        for i, blk in enumerate(model.transformer.h):
            self.hooks.append(blk.mlp.register_forward_pre_hook(lambda m, args, i=i: self.x.__setitem__(i, args[0])))
            self.hooks.append(blk.mlp.act.register_forward_hook(self._act(i, choose)))
            self.hooks.append(blk.mlp.register_forward_hook(lambda m, args, out, i=i: out + self.add.pop(i)))

    def _act(self, i, choose):
        def fn(_m, _args, out):
            x = self.x.pop(i)[0]
            keep, add = choose(i, x, out[0])
            self.add[i] = 0 if add is None else add[None]
            return out * keep[None]
        return fn

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "reference")
    ap.add_argument("--dims", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--finetune-tokens", type=int, default=409_600)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpt2cube-routing"))
    ap.add_argument("--resume", action="store_true", help="reuse files and checkpoints already in --workdir")
    args = ap.parse_args()
    if not BOOKS.is_dir():
        sys.exit(f"{BOOKS}: not found; this benchmark needs ../shared/data")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from gpt2cube.converter import convert
    from gpt2cube.eval.perplexity import llama_perplexity, perplexity
    from gpt2cube.eval.routed import routed_perplexity
    from gpt2cube.finetune.loop import FinetuneConfig, finetune
    from gpt2cube.finetune.routing import RoutingMask
    from gpt2cube.gguf_file import read_gguf
    from gpt2cube.hypercube.build import HypercubeOptions
    from gpt2cube.hypercube.calibrate import assign_neurons, calibration_tokens, capture, route
    from gpt2cube.hypercube.learn import contributions
    from gpt2cube.hypercube.metadata import read_hypercube
    from gpt2cube.hypercube.router import group_of
    from gpt2cube.hypercube.topology import Hypercube
    from gpt2cube.models import load_gpt2_checkpoint
    from gpt2cube.tokenizers import encode_text, hf_tokenizer

    torch.set_num_threads(args.threads)
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    text = (BOOKS / "pg35.txt").read_text(encoding="utf-8")
    held = np.array(encode_text(hf_tokenizer(), text))
    calib = BOOKS / "pg11.txt"

    def load(ckpt: Path):
        m, _ = load_gpt2_checkpoint(ckpt, "model")
        return m.float().eval()

    def torch_ppl(model) -> float:
        def logits(window):
            with torch.no_grad():
                return model(torch.from_numpy(window[None].astype(np.int64))).logits[0].numpy()
        return perplexity(held, 512, logits, "transformers", args.max_windows).ppl

    def file_of(name: str, dim: int, router: str) -> Path:
        path = wd / f"{name}.gguf"
        if not (args.resume and path.is_file()):
            convert(args.model, path, "f16", force=True, progress=False, log=log,
                    hypercube=HypercubeOptions(dim, calib, args.calib_tokens, router=router, router_radius=args.radius))
        return path

    def finetuned(name: str, routed: Path | None) -> Path:
        out = wd / name
        if not (args.resume and (out / "model.safetensors").is_file() and (out / "loss_curve.png").is_file()):
            finetune(FinetuneConfig(src=str(args.model), out=str(out), corpus=[str(BOOKS)], holdout=VALIDATION,
                                    exclude=["pg35.txt"], tokens=args.finetune_tokens, distill=str(args.model),
                                    routed=str(routed) if routed else None, radius=args.radius if routed else None),
                     force=True, progress=False, log=log)
        return out

    model = load(args.model)
    dense = torch_ppl(model)
    tokens, _ = calibration_tokens(calib, args.calib_tokens, model.config.vocab_size)
    xs = capture(model, tokens, lambda b: b.mlp, pre=True)
    acts = capture(model, tokens, lambda b: b.mlp.act, pre=False)
    downs = [b.mlp.c_proj.weight.detach().float().numpy() for b in model.transformer.h]
    means = [torch.from_numpy(a.mean(0)) for a in acts]                       # (F,) all-token means
    rows: list[dict] = []

    def add_row(dim: int, router: str, where: str, ppl: float, base: float, **extra) -> None:
        cube = Hypercube(dim)
        share = cube.ball_size(args.radius) / cube.n_vertices
        rows.append({"d": dim, "r": args.radius, "ffn_share": round(share, 4), "router": router, "run": where,
                     "ppl": round(ppl, 2), "dense_ppl": round(base, 2), "ratio": round(ppl / base, 4), **extra})
        log(f"d={dim} {router:24s} {where:12s} ppl {ppl:8.2f}  x{ppl / base:.3f}")

    def static_choice(share: float):
        keep = []
        for a, w in zip(acts, downs):
            score = contributions(a, w).mean(0)
            k = np.zeros(a.shape[1], np.float32)
            k[np.argsort(-score)[: int(round(share * a.shape[1]))]] = 1
            keep.append(torch.from_numpy(k))

        def choose(i, x, a):
            k = keep[i]
            return k.expand_as(a), ((1 - k) * means[i]) @ model.transformer.h[i].mlp.c_proj.weight
        return choose

    def topk_choice(info, n_keep: int, oracle: bool):
        groups, preds = [], []
        for i, (x, a, w) in enumerate(zip(xs, acts, downs)):
            go = group_of(info.permutation[i], info.n_vertices)
            groups.append(torch.from_numpy(go))
            onehot = np.eye(info.n_vertices, dtype=np.float32)[go]              # (F, V)
            mass = contributions(a, w) @ onehot                                  # (N, V)
            x1 = np.hstack([x, np.ones((len(x), 1), np.float32)])
            preds.append(torch.from_numpy(np.linalg.lstsq(x1, mass, rcond=None)[0].astype(np.float32)))

        def choose(i, x, a):
            if oracle:
                wn = torch.from_numpy(np.linalg.norm(downs[i], axis=1).astype(np.float32))
                c = (a - means[i]).abs() * wn
                score = torch.zeros(len(a), info.n_vertices).index_add_(1, groups[i], c)
            else:
                score = torch.cat([x, torch.ones(len(x), 1)], 1) @ preds[i]
            top = torch.zeros_like(score).scatter_(1, score.topk(n_keep, dim=1).indices, 1.0)  # (n, V)
            keep = top[:, groups[i]]
            return keep, ((1 - keep) * means[i]) @ model.transformer.h[i].mlp.c_proj.weight
        return choose

    def random_choice(dim: int, seed: int = 0):
        cube = Hypercube(dim)
        rng = np.random.default_rng(seed)
        ball = torch.from_numpy((cube.distances() <= args.radius).astype(np.float32))
        layers = []
        for x, a in zip(xs, acts):
            w = rng.normal(size=(dim, x.shape[1])).astype(np.float32)
            b = -np.median(x @ w.T, axis=0).astype(np.float32)
            perm = assign_neurons(route(x, w, b), a, cube)
            layers.append((w, b, torch.from_numpy(group_of(perm, cube.n_vertices))))

        def choose(i, x, a):
            w, b, go = layers[i]
            v = torch.from_numpy(route(x.numpy(), w, b))
            keep = ball[v][:, go]
            return keep, ((1 - keep) * means[i]) @ model.transformer.h[i].mlp.c_proj.weight
        return choose

    def with_hooks(m, make):
        h = make()
        try:
            return torch_ppl(m)
        finally:
            h.remove()

    control = None
    for dim in args.dims:
        cube = Hypercube(dim)
        n_keep = cube.ball_size(args.radius)
        share = n_keep / cube.n_vertices
        pca, learned = file_of(f"d{dim}-pca", dim, "pca"), file_of(f"d{dim}-learned", dim, "learned")
        info = read_hypercube(read_gguf(learned), learned)
        with torch.no_grad():
            add_row(dim, "pca, no comp", "pytorch", with_hooks(model, lambda: RoutingMask(model, pca, args.radius, False)), dense)
            add_row(dim, "pca + comp", "pytorch", with_hooks(model, lambda: RoutingMask(model, pca, args.radius)), dense)
            add_row(dim, "random + comp", "pytorch", with_hooks(model, lambda: Masked(model, random_choice(dim))), dense)
            add_row(dim, "static hot + comp", "pytorch", with_hooks(model, lambda: Masked(model, static_choice(share))), dense)
            add_row(dim, "top-k linear + comp", "pytorch",
                    with_hooks(model, lambda: Masked(model, topk_choice(info, n_keep, False))), dense)
            add_row(dim, "top-k oracle + comp", "pytorch",
                    with_hooks(model, lambda: Masked(model, topk_choice(info, n_keep, True))), dense)
            add_row(dim, "learned + comp", "pytorch", with_hooks(model, lambda: RoutingMask(model, learned, args.radius)), dense)
        file_dense = llama_perplexity(learned, text, max_windows=args.max_windows, n_threads=args.threads).ppl
        add_row(dim, "learned + comp", "engine",
                routed_perplexity(learned, text, radius=args.radius, max_windows=args.max_windows,
                                  n_threads=args.threads).ppl, file_dense)
        if args.no_finetune:
            continue
        if control is None:  # the same fine-tuning, unrouted: what the tokens alone buy
            ctrl = finetuned("ft-dense", None)
            control = llama_perplexity(_gguf(ctrl, wd / "ft-dense.gguf", None, args.resume, log), text,
                                       max_windows=args.max_windows, n_threads=args.threads).ppl
        ft = finetuned(f"ft-d{dim}", learned)
        ft_model = load(ft)
        with torch.no_grad():
            ft_torch = with_hooks(ft_model, lambda: RoutingMask(ft_model, learned, args.radius))
        add_row(dim, "learned + routed FT", "pytorch", ft_torch, dense, finetune_tokens=args.finetune_tokens)
        ft_file = _gguf(ft, wd / f"ft-d{dim}.gguf", learned, args.resume, log)
        ft_routed = routed_perplexity(ft_file, text, radius=args.radius, max_windows=args.max_windows,
                                      n_threads=args.threads).ppl
        ft_dense = llama_perplexity(ft_file, text, max_windows=args.max_windows, n_threads=args.threads).ppl
        add_row(dim, "learned + routed FT", "engine", ft_routed, ft_dense, finetune_tokens=args.finetune_tokens,
                vs_reference_dense=round(ft_routed / file_dense, 4), vs_dense_control=round(ft_routed / control, 4),
                control_ppl=round(control, 2))
    meta = {"model": str(args.model), "held_out": "pg35 (The Time Machine)", "windows": args.max_windows,
            "calibration": f"pg11, {args.calib_tokens} tokens", "radius": args.radius,
            "pytorch_dense_ppl": round(dense, 2),
            "finetune": None if args.no_finetune else f"finetune --distill reference --routed FILE, {args.finetune_tokens} "
                                                      "tokens of the training books (pg35 and validation books excluded)"}
    (wd / "routing_quality.md").write_text(_markdown(rows, meta))
    print_report(rows, meta, wd / "routing_quality.json")


def _gguf(ckpt: Path, path: Path, cube: Path | None, resume: bool, log) -> Path:
    from gpt2cube.converter import convert
    from gpt2cube.hypercube.build import HypercubeOptions

    if not (resume and path.is_file()):
        convert(ckpt, path, "f16", force=True, progress=False, log=log,
                hypercube=HypercubeOptions(0, None, source=cube) if cube else None)
    return path


def _markdown(rows: list[dict], meta: dict) -> str:
    head = "| d | r | FFN share | router | run | PPL | dense PPL | ratio |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['d']} | {r['r']} | {r['ffn_share']:.3f} | {r['router']} | {r['run']} | {r['ppl']} | "
                   f"{r['dense_ppl']} | {r['ratio']:.3f} |\n" for r in rows)
    return f"{json.dumps(meta)}\n\n{head}{body}"


if __name__ == "__main__":
    main()
