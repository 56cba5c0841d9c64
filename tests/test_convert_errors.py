"""Every bad input gets one clear message and a non-zero exit; no output (and no temporary file)
is left behind; the input is never modified."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpt2cube.cli import main


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def _run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture
def ckpt(checkpoints, tmp_path) -> Path:
    """A private copy of the small checkpoint that a test may damage."""
    src, _ = checkpoints["small"]
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _assert_fails(args, out: Path, code: int, *needles: str):
    result = _run(args)
    assert result.exit_code == code, result.output
    for n in needles:
        assert n in result.output, result.output
    assert result.output.count("error:") == 1
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*.partial"))
    return result


def test_missing_directory(tmp_path):
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(tmp_path / "nope"), "-o", str(out)], out, 2, "nope: no such directory")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(tmp_path / "empty"), "-o", str(out)], out, 2, "no config.json")


def test_missing_weights(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "no weights found", "model.safetensors")


def test_non_gpt2_architecture(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2,
                  "architecture LlamaForCausalLM is not supported", "supported: GPT2LMHeadModel")


def test_unsupported_activation(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "activation_function 'relu' is not supported")


def test_truncated_safetensors(ckpt, tmp_path):
    w = ckpt / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    before = _digest(ckpt)
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "model.safetensors", "the file is truncated")
    assert _digest(ckpt) == before


def test_corrupt_safetensors_header(ckpt, tmp_path):
    w = ckpt / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    w.write_bytes(bytes(data))
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "header is not valid JSON")


def test_tiny_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x01\x02")
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "2 bytes is too short")


def test_corrupt_torch_bin(checkpoints, tmp_path):
    src, _ = checkpoints["legacy_bin"]
    ckpt = Path(shutil.copytree(src, tmp_path / "bin"))
    w = ckpt / "pytorch_model.bin"
    w.write_bytes(w.read_bytes()[:1000])
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "pytorch_model.bin: cannot be read")


def test_shape_disagrees_with_config(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_inner"] = 512  # the weights have 4 * 256 = 1024
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2,
                  "tensor 'transformer.h.0.mlp.c_fc.weight' has shape [256, 1024]", "implies [256, 512]")


def test_existing_output_needs_force(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    result = _run(["convert", str(src), "-o", str(out)])
    assert result.exit_code == 3
    assert "already exists; pass --force" in result.output
    assert out.read_bytes() == b"keep me"
    assert _run(["convert", str(src), "-o", str(out), "--force", "--quiet"]).exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_output(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "o.gguf"
    result = _run(["convert", str(src), "-o", str(out)])
    assert result.exit_code == 3
    assert "is not a directory" in result.output
    out2 = tmp_path / "missing-dir" / "o.gguf"
    result = _run(["convert", str(src), "-o", str(out2)])
    assert result.exit_code == 3 and "does not exist" in result.output
    assert not out2.parent.exists()


def test_output_cannot_be_an_input_file(ckpt):
    before = _digest(ckpt)
    result = _run(["convert", str(ckpt), "-o", str(ckpt / "model.safetensors"), "--force"])
    assert result.exit_code == 3
    assert "is one of the input files" in result.output
    assert _digest(ckpt) == before


def test_unknown_type_is_a_usage_error(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    result = _run(["convert", str(src), "-o", str(tmp_path / "o.gguf"), "--type", "q3_x"])
    assert result.exit_code == 2
    assert "'q3_x' is not one of" in result.output


def test_successful_conversion_leaves_input_unchanged(ckpt, tmp_path):
    before = _digest(ckpt)
    assert _run(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf"), "--quiet"]).exit_code == 0
    assert _digest(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "o.gguf"]


def test_inspect_bad_files(tmp_path):
    result = _run(["inspect", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2 and "missing.gguf: no such file" in result.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    result = _run(["inspect", str(bad)])
    assert result.exit_code == 2 and "bad.gguf: not a readable GGUF file" in result.output


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, data unchanged."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * ((-len(new)) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


@pytest.mark.parametrize("damage, needle", [
    (lambda h: h["transformer.h.0.attn.c_attn.weight"].update(data_offsets=[-4, 10]), "expected 0 <= begin <= end"),
    (lambda h: h["transformer.h.0.attn.c_attn.weight"].update(shape=[-256, -768]), "expected non-negative integers"),
    (lambda h: h["transformer.h.0.attn.c_attn.weight"].update(
        data_offsets=[h["transformer.h.0.attn.c_attn.weight"]["data_offsets"][0] + 10**9,
                      h["transformer.h.0.attn.c_attn.weight"]["data_offsets"][1] + 10**9]), "the file is truncated"),
    (lambda h: h["transformer.h.0.ln_1.bias"].update(data_offsets=h["transformer.h.0.ln_1.weight"]["data_offsets"]),
     "overlap"),
])
def test_safetensors_header_entries_are_checked(ckpt, tmp_path, damage, needle):
    _rewrite_header(ckpt / "model.safetensors", damage)
    out = tmp_path / "o.gguf"
    _assert_fails(["convert", str(ckpt), "-o", str(out)], out, 2, "model.safetensors", needle)


def test_bf16_safetensors_input(checkpoints, tmp_path):
    """bf16, the most common dtype of Hugging Face checkpoints: read exactly (a bf16 value is the
    top half of its float32), and llama.cpp's logits on the f32 file equal transformers' on the
    bf16 model widened to float32."""
    import gguf
    import numpy as np
    import torch

    from gpt2cube.converter import convert
    from gpt2cube.eval.llama_runner import llama_logits
    from gpt2cube.models import hf_logits

    src, model = checkpoints["small"]
    bf = tmp_path / "bf16"
    shutil.copytree(src, bf)
    (bf / "model.safetensors").unlink()
    # copies: the session-wide fixture model must keep its float32 weights for other tests
    widened = copy.deepcopy(model).to(torch.bfloat16)
    widened.save_pretrained(bf)
    widened = widened.to(torch.float32)
    header = json.loads((bf / "model.safetensors").read_bytes()[8:8 + int.from_bytes((bf / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    out = tmp_path / "bf16.gguf"
    convert(bf, out, "f32", progress=False)
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    want = widened.transformer.h[0].attn.c_attn.weight.detach().numpy().T
    assert np.array_equal(np.asarray(t["blk.0.attn_qkv.weight"].data).reshape(want.shape), want)
    tokens = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    ref = hf_logits(widened, tokens)
    got = llama_logits(out, tokens)
    assert np.abs(got - ref).max() / ref.std() < 0.006  # the f32 tolerance of test_convert_llama


def test_padded_vocabulary(tmp_path):
    """vocab_size padded past the tokenizer (50304, as nanoGPT trains): the extra ids become
    unused [PAD] tokens, llama.cpp loads the file and its logits (all 50304) equal transformers'."""
    import numpy as np

    from gpt2cube.converter import convert
    from gpt2cube.eval.llama_runner import llama_logits
    from gpt2cube.models import hf_logits
    from gpt2cube.synth import make_random_gpt2

    src, model = make_random_gpt2(tmp_path / "pad", n_layer=1, n_embd=128, n_head=2, vocab_size=50304, init_std=0.1)
    out = tmp_path / "pad.gguf"
    convert(src, out, "f32", progress=False)
    import gguf

    r = gguf.GGUFReader(out)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(toks) == 50304 and toks[50257] == "[PAD50257]" and toks[50303] == "[PAD50303]"
    tokens = [464, 2068, 7586, 21831, 50256, 13]
    got, ref = llama_logits(out, tokens), hf_logits(model, tokens)
    assert got.shape == (6, 50304) and np.abs(got - ref).max() / ref.std() < 0.006


def test_llama_cpp_refusal_is_one_line(tmp_path):
    """A file llama.cpp refuses (here: a GGUF whose tensor data is cut off) reaches the user as
    one line naming it, exit 2, not llama-cpp-python's ValueError traceback."""
    from gguf import GGUFWriter

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(64))  # gguf-py already refuses it
    empty = tmp_path / "empty.gguf"  # a well-formed GGUF that llama.cpp refuses: a GPT-2 with no tensors
    w = GGUFWriter(empty, arch="gpt2")
    w.add_context_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for bad in (junk, empty):
        for args in (["bench", str(bad), "--n-prompt", "8", "--n-gen", "4", "--repeats", "1"],
                     ["generate", str(bad), "--prompt", "hi", "--n-tokens", "2"],
                     ["eval", "hellaswag", str(bad), "--data", str(bad)]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2, (args, res.output)
            assert res.output.count("error:") == 1 and bad.name in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["generate", str(empty), "--prompt", "hi", "--n-tokens", "2"])
    assert "llama.cpp could not load it" in res.output


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path):
    from gpt2cube.atomic import write_text, write_with

    out = tmp_path / "results.json"
    write_text(out, "old")

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_with(out, fails)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_text(out, "new")
    assert out.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
