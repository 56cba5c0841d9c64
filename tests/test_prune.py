"""FFN pruning: the pruned checkpoint is the original with the removed neurons held at a
constant (0, or their calibration mean folded into the bias), checked against the unpruned
model with those activations overwritten by a hook; the importance measures are what they say
(by hand, and Taylor against a finite difference of the loss); llama.cpp runs the result; bad
input is one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.errors import InputError
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.models import hf_logits, load_hf_model
from gpt2cube.prune import PruneConfig, prune
from gpt2cube.prune.ffn import _windows, kept_width
from gpt2cube.prune.importance import MEASURES, calibrate
from gpt2cube.synth import make_random_gpt2
from gpt2cube.train.data import load_tokens

LLAMA_F32_TOL = 0.006  # as tests/test_convert_llama.py: f32 weights, ggml's GELU table and sum order


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_random_gpt2(tmp_path_factory.mktemp("prune") / "m", n_layer=2, n_embd=64, n_head=4, n_positions=64,
                            n_inner=256, init_std=0.08, seed=5)[0]


def _run(src: Path, out: Path, corpus: Path, **kw) -> dict:
    cfg = PruneConfig(src=str(src), out=str(out), calib=[str(corpus)], ctx=32, calib_tokens=32 * 12, **kw)
    return prune(cfg, log=lambda m: None)


def _masked_logits(src: Path, kept: list[list[int]], const: list[np.ndarray], ids: torch.Tensor) -> np.ndarray:
    """The unpruned model with every removed neuron's activation overwritten by a constant."""
    model = load_hf_model(src)

    def hook(i):
        def fn(_m, inputs):
            a = inputs[0].clone()
            removed = np.setdiff1d(np.arange(a.shape[-1]), kept[i])
            a[..., removed] = torch.from_numpy(const[i][removed]).float()
            return (a,)
        return fn

    hs = [b.mlp.c_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        out = model(ids).logits.numpy()
    for h in hs:
        h.remove()
    return out


def _means_by_hand(src: Path, windows: np.ndarray) -> list[np.ndarray]:
    """Mean GELU output per neuron over the calibration windows, gathered with a forward hook on
    the activation module (not calibrate's c_proj pre-hook)."""
    model = load_hf_model(src)
    sums: dict[int, np.ndarray] = {}
    hs = [b.mlp.act.register_forward_hook(lambda _m, _i, o, i=i: sums.__setitem__(i, sums.get(i, 0) + o.detach().double().sum((0, 1)).numpy()))
          for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(torch.from_numpy(windows[:, :-1].astype(np.int64)))
    for h in hs:
        h.remove()
    n = windows[:, :-1].size
    return [sums[i] / n for i in range(len(sums))]


@pytest.mark.parametrize("compensate", [True, False])
def test_pruned_checkpoint_is_the_masked_original(src, corpus, tmp_path, compensate):
    out = tmp_path / "p"
    s = _run(src, out, corpus, ffn=0.25, compensate=compensate)
    assert s["kept_per_layer"] == 192 and s["removed_per_layer"] == 64
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_inner"] == 192
    kept = json.loads((out / "prune.json").read_text())["kept"]
    windows = _windows(load_tokens([corpus]), 32, 32 * 12, 0)
    const = _means_by_hand(src, windows) if compensate else [np.zeros(256)] * 2
    ids = torch.from_numpy(windows[:3, :-1].astype(np.int64))
    pruned = load_hf_model(out)
    with torch.no_grad():
        got = pruned(ids).logits.numpy()
    want = _masked_logits(src, kept, const, ids)
    # float32 through the same weights; the folded bias sums 64 products in another order
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).std()


def test_llama_cpp_runs_the_pruned_file(src, corpus, tmp_path, prompt_tokens):
    out = tmp_path / "p"
    _run(src, out, corpus, ffn=96)  # a count: 256 - 96 = 160 kept
    gguf = tmp_path / "p.gguf"
    convert(out, gguf, "f32", progress=False)
    r = GGUFReader(gguf)
    assert int(r.fields["gpt2.feed_forward_length"].contents()) == 160
    ref = hf_logits(load_hf_model(out), prompt_tokens)
    got = llama_logits(gguf, prompt_tokens)
    assert float(np.abs(got - ref).max() / ref.std()) <= LLAMA_F32_TOL


def test_importance_measures_by_hand(src, corpus):
    model = load_hf_model(src)
    windows = _windows(load_tokens([corpus]), 32, 32 * 8, 0)
    cal = calibrate(model, windows, gradients=True)
    means = _means_by_hand(src, windows)
    blk = model.transformer.h[1]
    w = {"up": blk.mlp.c_fc.weight.detach().numpy(), "down": blk.mlp.c_proj.weight.detach().numpy()}
    np.testing.assert_allclose(cal.mean[1], means[1], rtol=1e-6, atol=1e-9)
    # activation: E[(a - mean)^2] ||W_down[j]||^2, from activations gathered here
    acts = {}
    h = blk.mlp.act.register_forward_hook(lambda _m, _i, o: acts.__setitem__("a", o.detach().double().reshape(-1, 256).numpy()))
    with torch.no_grad():
        model(torch.from_numpy(windows[:, :-1].astype(np.int64)))
    h.remove()
    a = acts["a"]
    want = a.var(axis=0) * (w["down"].astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(MEASURES["activation"][1](w, cal, 1, True, None), want, rtol=1e-6)
    want0 = (a * a).mean(axis=0) * (w["down"].astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(MEASURES["activation"][1](w, cal, 1, False, None), want0, rtol=1e-6)
    mag = np.array([np.linalg.norm(w["up"][:, j]) * np.linalg.norm(w["down"][j]) for j in range(256)])
    np.testing.assert_allclose(MEASURES["magnitude"][1](w, cal, 1, True, None), mag, rtol=1e-5)
    r1 = MEASURES["random"][1](w, cal, 1, True, np.random.default_rng(3))
    assert np.array_equal(r1, MEASURES["random"][1](w, cal, 1, True, np.random.default_rng(3)))


def test_taylor_is_the_first_order_loss_change(src, corpus):
    """|sum (a - c) dL/da| against a finite difference: moving neuron j's activation a step eps
    towards c changes the summed loss by -eps * sum (a - c) g + O(eps^2)."""
    import torch.nn.functional as F

    model = load_hf_model(src)
    windows = _windows(load_tokens([corpus]), 32, 32 * 4, 0)
    cal = calibrate(model, windows, gradients=True)
    blk = model.transformer.h[0]
    w = {"up": blk.mlp.c_fc.weight.detach().numpy(), "down": blk.mlp.c_proj.weight.detach().numpy()}
    score = MEASURES["taylor"][1](w, cal, 0, True, None)
    xy = torch.from_numpy(windows.astype(np.int64))

    def loss_with(j: int, eps: float) -> float:
        c = torch.tensor(cal.mean[0][j], dtype=torch.float64)

        def fn(_m, inputs):
            a = inputs[0].double().clone()
            a[..., j] -= eps * (a[..., j] - c)
            return (a.float(),)
        hk = blk.mlp.c_proj.register_forward_pre_hook(fn)
        with torch.no_grad():
            logits = model(xy[:, :-1]).logits
        hk.remove()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), xy[:, 1:].reshape(-1), reduction="sum"))

    base = loss_with(0, 0.0)
    for j in np.argsort(-score)[:3]:  # the most important neurons: a change well above float noise
        eps = 1e-2
        fd = (base - loss_with(int(j), eps)) / eps
        assert abs(abs(fd) - score[j]) <= 0.05 * score[j] + 1e-3, (j, fd, score[j])


def test_bias_compensation_lowers_the_error(src, corpus, tmp_path):
    ids = torch.from_numpy(_windows(load_tokens([corpus]), 32, 32 * 6, 1)[:, :-1].astype(np.int64))
    with torch.no_grad():
        ref = load_hf_model(src)(ids).logits.numpy()
    err = {}
    for comp in (True, False):
        out = tmp_path / f"c{comp}"
        _run(src, out, corpus, ffn=0.5, compensate=comp)
        with torch.no_grad():
            err[comp] = float(((load_hf_model(out)(ids).logits.numpy() - ref) ** 2).mean())
    assert err[True] < err[False]


def test_kept_width_rules():
    assert kept_width(3072, 0.25, 1) == 2304 and kept_width(3072, 0.1, 256) == 2560
    assert kept_width(1024, 256, 32) == 768
    for ffn, mult, msg in [(1024, 32, "leaves 0 of 1024"), (2.5, 1, "a count of neurons must be a whole number"),
                           (-0.1, 1, "expected a fraction in [0, 1)"), (0.95, 256, "0 after rounding down to a multiple of 256"),
                           (0.5, 0, "--multiple-of 0")]:
        with pytest.raises(InputError, match=re.escape(msg)):
            kept_width(1024, ffn, mult)


@pytest.mark.parametrize("args, message", [
    (["--ffn", "0.25"], "needs --calib TEXT"),
    (["--ffn", "256", "--calib", "{corpus}"], "--ffn 256.0 leaves 0 of 256 neurons per layer"),
    (["--ffn", "0.25", "--importance", "magnitude", "--no-bias-compensation", "--out", "{src}"], "is the input checkpoint"),
])
def test_bad_input_is_one_line(src, corpus, tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.format(corpus=corpus, src=src) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    before = sorted(p.name for p in src.iterdir())
    res = CliRunner().invoke(main, ["prune", str(src), *args])
    assert res.exit_code in (2, 3), res.output  # input error, output error
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()
    assert sorted(p.name for p in src.iterdir()) == before  # the input is never modified


def test_not_gpt2_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    res = CliRunner().invoke(main, ["prune", str(bad), "--out", str(tmp_path / "o"), "--ffn", "0.5",
                                    "--importance", "random", "--no-bias-compensation"])
    assert res.exit_code != 0 and "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_weight_only_measures_need_no_text(src, tmp_path):
    out = tmp_path / "m"
    res = CliRunner().invoke(main, ["prune", str(src), "--out", str(out), "--ffn", "0.1", "--importance", "magnitude",
                                    "--no-bias-compensation", "--multiple-of", "32", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept_per_layer"] == 224  # 256 - 26 = 230, rounded down to 224


def test_recovery_by_distillation_from_the_unpruned_model(src, corpus, tmp_path):
    """prune -> finetune --distill SRC: the pruned student trains against the unpruned teacher
    and its validation loss falls below the pruned starting point."""
    from gpt2cube.finetune.loop import FinetuneConfig, finetune

    pruned = tmp_path / "p"
    _run(src, pruned, corpus, ffn=0.5)
    cfg = FinetuneConfig(src=str(pruned), out=str(tmp_path / "ft"), corpus=[str(corpus)], holdout=["b.txt"], ctx=32,
                         batch_size=4, tokens=32 * 4 * 12, lr=2e-3, warmup_steps=2, eval_every=4, seed=3,
                         precision="fp32", distill=str(src), distill_weight=0.5)
    s = finetune(cfg, progress=False, log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert s["best"]["val_loss"] < rows[0]["val_loss"]
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["n_inner"] == 128


RECIPE_63MB = Path(__file__).resolve().parents[1] / "recipes" / "gpt2-124m-63mb.toml"


def test_recipe_supplies_the_options_and_the_command_line_wins(src, tmp_path):
    """The shipped 63 MB recipe's [prune] table drives `prune` (a third of the FFN: 256 -> 171
    kept, 160 after rounding down to its multiple of 32); an option given on the command line
    overrides the file. Weight-only importance keeps the test free of calibration text."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE_63MB.read_text().replace('importance = "activation"', 'importance = "magnitude"'))
    base = ["prune", str(src), "--recipe", str(recipe), "--no-bias-compensation", "--json"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["kept_per_layer"] == 160 and summary["config"]["importance"] == "magnitude"
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b"), "--ffn", "64"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept_per_layer"] == 192


def test_convert_reads_the_recipe_types_and_ignores_prune(tmp_path):
    """The same file as `convert --recipe`: every weight matrix in Q4_K (a random checkpoint
    whose FFN width is the recipe's 124M result, 2048 = 8 x 256 at 64 wide)."""
    m = make_random_gpt2(tmp_path / "m", n_layer=1, n_embd=256, n_head=4, n_positions=64, n_inner=512, seed=2)[0]
    res = CliRunner().invoke(main, ["convert", str(m), "-o", str(tmp_path / "m.gguf"), "--type", "f16",
                                    "--recipe", str(RECIPE_63MB), "--quiet"])
    assert res.exit_code == 0, res.output
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert {types[n] for n in types if n.endswith("weight") and "norm" not in n} == {"Q4_K"}, types


@pytest.mark.parametrize("body, message", [
    ("[types]\n\"*\" = \"q4_k\"\n", "no [prune] table"),
    ("[prune]\nffn = \"half\"\n", "[prune] ffn = 'half'; expected the fraction below 1 or count"),
    ("[prune]\nffn = 0.25\nheads = 0.25\n", "[prune] key 'heads' is unknown"),
    ("[prune]\nffn = 0.25\nimportance = \"loudness\"\n", "[prune] importance = 'loudness'; expected activation"),
    ("[prune\nffn = 0.25\n", "not valid TOML"),
])
def test_bad_recipe_is_one_line(src, tmp_path, body, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", str(src), "--out", str(out), "--recipe", str(recipe),
                                    "--no-bias-compensation"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and str(recipe) in res.output
    assert not out.exists()
