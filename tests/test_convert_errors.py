"""Every bad input gets one clear message and a non-zero exit; no output (and no temporary file)
is left behind; the input is never modified."""

from __future__ import annotations

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
