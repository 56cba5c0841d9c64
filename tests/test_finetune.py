"""Recovery fine-tuning: QAT computes with exactly the values `convert` stores, the straight-through
gradient and the lambda warm-up do what they say, distillation and the spam task are wired as
documented, resuming is exact, and bad input gets one clear line.

The exactness checks compare against gguf-py's own dequantizer (an implementation independent of
ours) on the converted file, with np.array_equal: no tolerance. The llama.cpp check reuses
ACT_TOL's reasoning from test_quantized_llama: what remains between the QAT forward and llama.cpp
is llama.cpp quantizing activations (measured 0.10-0.16 x std on such fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.converter.plan import Recipe
from gpt2cube.errors import InputError, OutputError
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.eval.spam import prompt_for
from gpt2cube.finetune.loop import FinetuneConfig, finetune
from gpt2cube.finetune.qat import QuantizedWeights
from gpt2cube.models import load_hf_model
from gpt2cube.synth import make_random_gpt2
from gpt2cube.tokenizers import GGUFTokenizer

ACT_TOL = 0.25


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return make_random_gpt2(tmp_path_factory.mktemp("ft") / "student", n_layer=2, n_embd=256, n_head=4,
                            n_positions=64, init_std=0.05, seed=11)[0]


def _cfg(student: Path, out: Path, corpus: Path, **kw) -> FinetuneConfig:
    base = dict(src=str(student), out=str(out), task="lm", corpus=[str(corpus)], holdout=["b.txt"], ctx=32,
                batch_size=4, tokens=32 * 4 * 6, lr=1e-3, warmup_steps=2, eval_every=3, seed=3, precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def _gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 (rows, ne0), decoded by gguf-py."""
    return {t.name: gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape[::-1].tolist())
            for t in GGUFReader(path).tensors}


def _assert_file_holds_qat_values(ckpt: Path, gguf: Path, recipe: Recipe) -> int:
    model = load_hf_model(ckpt)
    qw = QuantizedWeights(model, recipe)
    stored = _gguf_weights(gguf)
    state = qw.state()
    for q in qw.params:
        want = state[q.name].numpy()
        want = want.T if q.spec.transpose else want
        got = stored[q.spec.gguf_name]
        assert got.shape == want.shape, q.spec.gguf_name
        assert np.array_equal(got, want), (q.spec.gguf_name, q.qtype, float(np.abs(got - want).max()))
    return len(qw.params)


RECIPES = {
    "tq2_0": Recipe(linear="tq2_0"),                                   # embeddings q6_k
    "tq1_0-row-q4k": Recipe(linear="tq1_0", embed="q4_k", ternary_scale="row"),
    "tq2_0-row-fit": Recipe(linear="tq2_0", embed="q8_0", ternary_scale="row-fit"),  # --init gptq's rule
    "q4_k": Recipe(linear="q4_k"),
    "q4_0": Recipe(linear="q4_0", embed="q8_0"),
    "q8_0": Recipe(linear="q8_0", embed="f16"),
    "mixed": Recipe(linear="q4_k", embed="q4_0", patterns=[("blk.*.ffn_down.weight", "tq2_0"),
                                                           ("blk.1.attn_qkv.weight", "q8_0")]),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_fake_quant_is_what_convert_stores(student, tmp_path, name):
    recipe = RECIPES[name]
    out = tmp_path / "m.gguf"
    convert(student, out, recipe, progress=False, log=lambda m: None)
    n = _assert_file_holds_qat_values(student, out, recipe)
    assert n == 4 * 2 + 2  # every linear layer of both blocks, token and position embeddings


def test_fallback_types_follow_convert(tmp_path):
    """Rows of 192 do not fit ternary blocks: QAT falls back exactly as convert does, and --strict refuses."""
    ckpt = make_random_gpt2(tmp_path / "odd", n_layer=1, n_embd=192, n_head=3, n_inner=512, n_positions=32,
                            init_std=0.05, seed=2)[0]
    recipe = Recipe(linear="tq2_0", embed="q8_0")
    qw = QuantizedWeights(load_hf_model(ckpt), recipe)
    assert qw.types()["blk.0.attn_qkv.weight"] == "q4_0" and qw.types()["blk.0.ffn_down.weight"] == "tq2_0"
    assert any("q4_0" in w for w in qw.warnings)
    out = tmp_path / "odd.gguf"
    convert(ckpt, out, recipe, progress=False, log=lambda m: None)
    _assert_file_holds_qat_values(ckpt, out, recipe)
    with pytest.raises(InputError, match="cannot be tq2_0"):
        QuantizedWeights(load_hf_model(ckpt), Recipe(linear="tq2_0", embed="q8_0", strict=True))


def test_active_blends_and_restores(student):
    import torch

    model = load_hf_model(student)
    qw = QuantizedWeights(model, Recipe(linear="tq2_0"))
    q = next(p for p in qw.params if p.spec.gguf_name == "blk.0.ffn_up.weight")
    latent = q.param.detach().clone()
    target = qw.state()[q.name]
    assert not torch.equal(latent, target)
    with qw.active(0.0):
        assert torch.equal(q.param.detach(), latent)
    with qw.active(0.25):
        assert torch.allclose(q.param.detach(), latent + 0.25 * (target - latent), atol=1e-7)
    with pytest.raises(RuntimeError):
        with qw.active(1.0):
            assert torch.equal(q.param.detach(), target)
            raise RuntimeError("boom")
    assert torch.equal(q.param.detach(), latent)  # put back even after an error


def test_straight_through_gradient(student):
    """The gradient on the latent weight is the gradient of the loss at the quantized weights."""
    import torch

    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    ste = load_hf_model(student)
    qw = QuantizedWeights(ste, Recipe(linear="q4_0"))
    with qw.active(1.0):
        ste(ids, labels=ids).loss.backward()
    ref = load_hf_model(student)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, w in qw.state().items():
            params[name].copy_(w)
    ref(ids, labels=ids).loss.backward()
    for name, p in ste.named_parameters():
        assert torch.allclose(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-7), name


def test_qat_run_converts_to_the_trained_weights(student, corpus, tmp_path, prompt_tokens):
    import torch

    out = tmp_path / "qat"
    # no --embed-type: ternary QAT keeps q8_0 embeddings (convert's own ternary default is q6_k)
    summary = finetune(_cfg(student, out, corpus, qat="tq2_0", qat_warmup=3), progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("lambda") for r in rows[1:4]] == [round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]          # the as-converted starting point
    assert summary["best"]["val_loss"] <= rows[0]["val_loss"]
    record = json.loads((out / "finetune.json").read_text())
    assert record["qat_tensor_types"]["blk.0.attn_qkv.weight"] == "tq2_0"
    assert record["qat_tensor_types"]["token_embd.weight"] == "q8_0"
    gguf = tmp_path / "qat.gguf"
    convert(out, gguf, Recipe(linear="tq2_0", embed="q8_0"), progress=False, log=lambda m: None)
    _assert_file_holds_qat_values(out, gguf, Recipe(linear="tq2_0", embed="q8_0"))
    # `gpt2cube convert` without --embed-type stores what QAT trained (the recorded embedding type)
    f = tmp_path / "cli.gguf"
    r = CliRunner().invoke(main, ["convert", str(out), "-o", str(f), "--type", "tq2_0", "--quiet"])
    assert r.exit_code == 0, r.output
    _assert_file_holds_qat_values(out, f, Recipe(linear="tq2_0", embed="q8_0"))
    # the embeddings were frozen under QAT: the latent ones are the student's
    a, b = load_hf_model(out), load_hf_model(student)
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, b.transformer.h[0].mlp.c_fc.weight)
    # llama.cpp on the file computes what the QAT forward computed
    toks = prompt_tokens[:32]
    qw = QuantizedWeights(a, Recipe(linear="tq2_0", embed="q8_0"))
    with torch.no_grad(), qw.active(1.0):
        ref = a(torch.tensor([toks])).logits[0].numpy()
    got = llama_logits(gguf, toks)
    assert float(np.abs(got - ref).max() / ref.std()) < ACT_TOL


def test_convert_uses_the_ternary_scale_qat_trained_with(student, corpus, tmp_path):
    """A row-scale QAT checkpoint converted without --ternary-scale stores the values it was trained
    on; an explicit other rule is obeyed with a warning; a broken record is one clear line."""
    out = tmp_path / "qat-row"
    finetune(_cfg(student, out, corpus, qat="tq2_0", ternary_scale="row", tokens=32 * 4 * 2), progress=False)
    gguf = tmp_path / "row.gguf"
    res = CliRunner().invoke(main, ["convert", str(out), "-o", str(gguf), "--type", "tq2_0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.stderr
    # QAT kept q8_0 embeddings (ternary QAT's default) and convert takes the recorded type
    _assert_file_holds_qat_values(out, gguf, Recipe(linear="tq2_0", embed="q8_0", ternary_scale="row"))
    other = tmp_path / "tensor.gguf"
    res = CliRunner().invoke(main, ["convert", str(out), "-o", str(other), "--type", "tq2_0", "--ternary-scale",
                                    "tensor", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "trained with --ternary-scale row" in res.stderr
    _assert_file_holds_qat_values(out, other, Recipe(linear="tq2_0", embed="q8_0", ternary_scale="tensor"))
    assert not np.array_equal(_gguf_weights(gguf)["blk.0.ffn_up.weight"], _gguf_weights(other)["blk.0.ffn_up.weight"])
    (out / "finetune.json").write_text("{not json")
    bad = tmp_path / "bad.gguf"
    res = CliRunner().invoke(main, ["convert", str(out), "-o", str(bad), "--type", "tq2_0", "--quiet"])
    assert res.exit_code != 0 and "finetune.json: cannot read the fine-tuning record" in res.output
    (out / "finetune.json").write_text('{"config": [1]}')
    res = CliRunner().invoke(main, ["convert", str(out), "-o", str(bad), "--type", "tq2_0", "--quiet"])
    assert res.exit_code != 0 and "no 'config' object" in res.output
    assert not bad.exists()


def test_resume_is_exact(student, corpus, tmp_path):
    import torch

    whole, part = tmp_path / "whole", tmp_path / "part"
    finetune(_cfg(student, whole, corpus, qat="q4_0"), progress=False)
    finetune(_cfg(student, part, corpus, qat="q4_0", stop_at=3), progress=False)
    finetune(_cfg(student, part, corpus, qat="q4_0"), resume=True, progress=False)
    a = torch.load(whole / "train_state.pt", weights_only=False)
    b = torch.load(part / "train_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(x)["loss"] for x in (whole / "train_log.jsonl").read_text().splitlines()[1:]]
    lb = [json.loads(x)["loss"] for x in (part / "train_log.jsonl").read_text().splitlines()[1:]]
    assert la == lb
    with pytest.raises(InputError, match="--resume: lr = 0.002"):
        finetune(_cfg(student, part, corpus, qat="q4_0", lr=2e-3), resume=True, progress=False)


def test_distillation_from_itself_starts_at_zero(student, corpus, tmp_path):
    """Student = teacher, pure KL: the first step's loss is 0 (and the LM loss mixes in linearly)."""
    out = tmp_path / "kd"
    finetune(_cfg(student, out, corpus, distill=str(student), distill_weight=1.0, stop_at=1), progress=False)
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[1])
    assert abs(first["loss"]) < 1e-4
    out2 = tmp_path / "ce"
    finetune(_cfg(student, out2, corpus, stop_at=1), progress=False)
    out3 = tmp_path / "half"
    finetune(_cfg(student, out3, corpus, distill=str(student), distill_weight=0.5, stop_at=1), progress=False)
    ce = json.loads((out2 / "train_log.jsonl").read_text().splitlines()[1])["loss"]
    half = json.loads((out3 / "train_log.jsonl").read_text().splitlines()[1])["loss"]
    assert half == pytest.approx(ce / 2, abs=2e-4)


def test_bad_teachers(student, corpus, tmp_path):
    small_vocab = make_random_gpt2(tmp_path / "v", n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=1000)[0]
    with pytest.raises(InputError, match="vocabulary has 1000 tokens, the student's 50257"):
        finetune(_cfg(student, tmp_path / "o1", corpus, distill=str(small_vocab)), progress=False)
    short = make_random_gpt2(tmp_path / "c", n_layer=1, n_embd=64, n_head=2, n_positions=16)[0]
    with pytest.raises(InputError, match="16 positions, fewer than the student's training context 32"):
        finetune(_cfg(student, tmp_path / "o2", corpus, distill=str(short)), progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


SPAM_WORDS = ["WIN a FREE prize now, call 0800 {n} to claim your cash!", "URGENT! You have won {n} pounds, text CLAIM"]
HAM_WORDS = ["ok see you at {n} tonight, bring the book", "sorry I am late, the bus was slow again {n}"]


def _spam_file(path: Path, n: int = 40) -> Path:
    lines = [f"spam\t{SPAM_WORDS[i % 2].format(n=i)}" for i in range(n // 4)]
    lines += [f"ham\t{HAM_WORDS[i % 2].format(n=i)}" for i in range(n - n // 4)]
    lines += [lines[0], lines[-1]]  # duplicates: dropped before splitting
    path.write_text("\n".join(lines) + "\n")
    return path


def test_spam_task_trains_on_the_eval_prompt(student, tmp_path):
    from gpt2cube.eval.spam import deduplicate, make_split, read_sms
    from gpt2cube.finetune.loop import _tokenizer_for
    from gpt2cube.finetune.tasks import SpamTask

    data = _spam_file(tmp_path / "sms.txt")
    task = SpamTask(data, _tokenizer_for(student), "stratified", 4, 128)
    msgs = deduplicate(read_sms(data)).messages
    test = set(make_split(msgs, "stratified").test)
    assert not test & (set(task.train_idx) | set(task.val_idx))  # the test split is never read
    assert not set(task.train_idx) & set(task.val_idx)
    tok = GGUFTokenizer(_converted(student, tmp_path))
    try:
        for i in task.train_idx[:5]:  # exactly the ids llama.cpp gives `eval spam`'s prompt
            assert task.encoded[i] == tok.encode(prompt_for(msgs[i].text, []))
    finally:
        tok.close()
    b = task._batch(task.train_idx[:3])
    flat = b.ids.reshape(-1)
    for r, i in enumerate(task.train_idx[:3]):
        assert flat[b.scored[r]].item() == task.encoded[i][-1]  # scored at the prompt's last token
        assert b.targets[r].item() == task.label_ids[msgs[i].label]


def test_spam_lm_term_is_the_weighted_loss_over_message_tokens(student, tmp_path):
    """(1 - a) * the label's CE + a * the mean next-token CE over the messages' own tokens,
    checked against transformers' logits over the whole padded batch."""
    import torch
    import torch.nn.functional as F

    from gpt2cube.finetune.loop import _tokenizer_for
    from gpt2cube.finetune.losses import HeadLoss
    from gpt2cube.finetune.tasks import SpamTask

    tok = _tokenizer_for(student)
    task = SpamTask(_spam_file(tmp_path / "sms.txt"), tok, "stratified", 4, 128, lm_weight=0.3)
    idx = task.train_idx[:3]
    b = task._batch(idx, 0.3)
    model = load_hf_model(student)
    model.eval()
    logits = model(b.ids).logits.float()
    header = len(tok(prompt_for("", []).split("Message:")[0] + "Message:")["input_ids"])
    label, lm = [], []
    for r, i in enumerate(idx):
        s = task.encoded[i]
        assert tok.decode(s[header:]).startswith(" " + task.msgs[i].text.split()[0])  # the message starts there
        label.append(F.cross_entropy(logits[r, len(s) - 1][None], torch.tensor([task.label_ids[task.msgs[i].label]])))
        lm.append(F.cross_entropy(logits[r, header - 1 : len(s) - 1], torch.tensor(s[header:]), reduction="none"))
    want = 0.7 * torch.stack(label).mean() + 0.3 * torch.cat(lm).mean()
    got = HeadLoss(model).backward(b)
    # float32 sums in another order (chunked head vs one full forward): a few ulps of a loss ~11
    want = float(want.detach())
    assert abs(got - want) < 1e-4 * want
    assert abs(float(b.weights.sum()) - 1) < 1e-6
    plain = task._batch(idx)  # lm_weight 0: the label alone, as validation scores it
    assert plain.weights is None and len(plain.targets) == 3


def _converted(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{ckpt.name}.gguf"
    if not out.exists():
        convert(ckpt, out, "f16", progress=False, log=lambda m: None)
    return out


def test_spam_finetune_lowers_validation_loss(student, tmp_path):
    out = tmp_path / "spam"
    data = _spam_file(tmp_path / "sms.txt", 80)
    res = CliRunner().invoke(main, ["finetune", str(student), "--out", str(out), "--task", "spam", "--data", str(data),
                                    "--tokens", "4000", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "5",
                                    "--precision", "fp32", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert summary["best"]["val_loss"] < rows[0]["val_loss"] / 2
    assert summary["split"]["name"] == "stratified" and summary["train_messages"] > 0


@pytest.mark.parametrize("task, qat, flag, frozen", [
    ("lm", "tq2_0", None, True), ("spam", "tq2_0", None, False), ("lm", None, None, False),
    ("spam", "tq2_0", True, True), ("lm", "tq2_0", False, False),
])
def test_embeddings_default_per_task(task, qat, flag, frozen):
    cfg = FinetuneConfig(src="s", out="o", task=task, qat=qat, freeze_embeddings=flag).resolved()
    assert cfg.freeze_embeddings is frozen


def test_spam_qat_trains_the_embeddings_by_default(student, tmp_path):
    out = tmp_path / "spam-qat"
    data = _spam_file(tmp_path / "sms.txt", 40)
    res = CliRunner().invoke(main, ["finetune", str(student), "--out", str(out), "--task", "spam", "--data", str(data),
                                    "--qat", "q8_0", "--tokens", "600", "--batch-size", "4", "--eval-every", "2",
                                    "--precision", "fp32", "--quiet"])
    assert res.exit_code == 0, res.output
    before, after = load_hf_model(student), load_hf_model(out)
    wte = "transformer.wte.weight"
    assert not np.array_equal(before.state_dict()[wte].numpy(), after.state_dict()[wte].numpy())
    assert json.loads((out / "finetune.json").read_text())["config"]["freeze_embeddings"] is False


@pytest.mark.parametrize("args, message", [
    (["--task", "spam", "--data", "{bad}"], "sms.txt:2: expected 'ham' or 'spam'"),
    (["--task", "lm"], "--task lm needs --corpus"),
    (["--task", "spam"], "--task spam needs --data"),
    (["--task", "lm", "--corpus", "{corpus}", "--distill-weight", "1.5"], "--distill-weight 1.5; expected a number in [0, 1]"),
    (["--task", "lm", "--corpus", "{corpus}", "--tokens", "0"], "--tokens 0; expected a positive number"),
    (["--task", "spam", "--data", "{good}", "--lm-weight", "1"], "--lm-weight 1.0; expected a number in [0, 1)"),
    (["--task", "lm", "--corpus", "{corpus}", "--lm-weight", "0.5"], "--lm-weight 0.5 applies to --task spam"),
])
def test_bad_input_is_one_line(student, corpus, tmp_path, args, message):
    bad = tmp_path / "sms.txt"
    bad.write_text("ham\tfine\nnot a label line\n")
    out = tmp_path / "out"
    good = _spam_file(tmp_path / "good.txt")
    args = [a.format(bad=bad, corpus=corpus, good=good) for a in args]
    res = CliRunner().invoke(main, ["finetune", str(student), "--out", str(out), *args, "--quiet"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_refuses_non_gpt2_and_protects_outputs(student, corpus, tmp_path):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (other / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InputError, match="LlamaForCausalLM is not supported"):
        finetune(_cfg(other, tmp_path / "o", corpus), progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(OutputError, match="is the input checkpoint"):
        finetune(_cfg(student, student, corpus), progress=False)
    out = tmp_path / "done"
    finetune(_cfg(student, out, corpus, stop_at=1), progress=False)
    with pytest.raises(OutputError, match="already holds a checkpoint"):
        finetune(_cfg(student, out, corpus), progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        finetune(_cfg(student, tmp_path / "fresh", corpus), resume=True, progress=False)


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "reference-ternary" / "reference-tq2_0.gguf"
REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg" / "books" / "pg35.txt"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="models/reference-ternary is not in this checkout")
def test_shipped_ternary_model_is_what_recovery_md_says():
    from gpt2cube.inspect_gguf import inspect_gguf

    info = inspect_gguf(SHIPPED)
    assert info["file_bytes"] <= 10 * 2**20  # 10 MiB
    types = {t["name"]: t["type"].lower() for t in info["tensors"]}
    assert {types[f"blk.{i}.{n}.weight"] for i in range(6) for n in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")} \
        == {"tq2_0"}
    assert types["token_embd.weight"] == "q4_k"


@pytest.mark.skipif(not (SHIPPED.is_file() and BOOK.is_file()), reason="needs models/reference-ternary and ../shared/data")
def test_shipped_ternary_model_beats_plain_ternarization(tmp_path):
    """On the held-out book the recovered file is far better than the reference ternarized
    without training (same types); 4 windows, where the two differ by a factor of about 2."""
    from gpt2cube.eval.perplexity import llama_perplexity

    plain = tmp_path / "plain.gguf"
    convert(REFERENCE, plain, Recipe(linear="tq2_0", embed="q4_k"), progress=False, log=lambda m: None)
    text = BOOK.read_text(encoding="utf-8")[: 4 * 512 * 8]
    recovered = llama_perplexity(SHIPPED, text, 512, max_windows=4).ppl
    as_converted = llama_perplexity(plain, text, 512, max_windows=4).ppl
    assert recovered < 0.7 * as_converted, (recovered, as_converted)


def test_convert_takes_the_embedding_type_a_qat_record_names(tmp_path):
    from gpt2cube.converter.plan import embed_type_for

    d = tmp_path / "ckpt"
    d.mkdir()
    assert embed_type_for(d, None) is None  # no record: the recipe's default
    (d / "finetune.json").write_text(json.dumps({"config": {"qat": "tq2_0"},
                                                 "qat_tensor_types": {"token_embd.weight": "q4_k"}}))
    assert embed_type_for(d, None) == "q4_k" and embed_type_for(d, "q6_k") == "q6_k"
    (d / "finetune.json").write_text(json.dumps({"config": {"qat": None}}))
    assert embed_type_for(d, None) is None  # fine-tuned without QAT: nothing to keep
    (d / "finetune.json").write_text("[1]")
    with pytest.raises(InputError, match="finetune.json: no 'config' object"):
        embed_type_for(d, None)
