"""Perplexity: the window / second-half scoring on a hand-computable case, llama.cpp against
transformers on the same windows, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.eval.perplexity import (
    hf_perplexity,
    llama_perplexity,
    perplexity,
    scored_nll,
    window_starts,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_windows_and_second_half_scoring_by_hand():
    assert window_starts(10, 4) == [0, 4]  # the 2-token tail is dropped
    # ctx 4, first = 2: only the logits at position 2 predict token 3 in each window.
    # Logits favour token (position + 1) with log-probabilities we can write down.
    V = 4
    logits = np.zeros((4, V))
    logits[2, 1] = math.log(3)  # p(token 1 | pos 2) = 3 / (3 + 3) = 1/2, others 1/6
    window = np.array([0, 0, 0, 1])
    assert np.allclose(scored_nll(logits, window), [math.log(2)])
    tokens = np.array([0, 0, 0, 1, 0, 0, 0, 2, 9])
    r = perplexity(tokens, 4, lambda w: logits, "hand")
    # two scored tokens: nll log 2 (token 1) and log 6 (token 2, probability 1/6)
    assert r.tokens_scored == 2 and r.windows == 2
    assert math.isclose(r.ppl, math.exp((math.log(2) + math.log(6)) / 2))
    var = ((math.log(2) ** 2 + math.log(6) ** 2) / 2) - ((math.log(2) + math.log(6)) / 2) ** 2
    assert math.isclose(r.ppl_stderr, r.ppl * math.sqrt(var / 1))


def test_llama_cpp_equals_transformers_on_same_windows(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    gguf_path = tmp_path / "m.gguf"
    convert(src, gguf_path, "f32", progress=False)
    text = " ".join(f"Sentence number {i} talks about the {w} of the {v}." for i, (w, v) in
                    enumerate([("colour", "sea"), ("weight", "stone"), ("price", "bread")] * 25))
    a = llama_perplexity(gguf_path, text, 64)
    b = hf_perplexity(src, text, 64)
    assert a.tokens_scored == b.tokens_scored and a.windows == b.windows >= 5
    # f32 weights, f16 KV cache (llama-perplexity's default): agreement well inside 0.5 %
    assert abs(a.ppl / b.ppl - 1) < 0.001, (a.ppl, b.ppl)


def test_cli_perplexity_and_errors(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    gguf_path = tmp_path / "m.gguf"
    convert(src, gguf_path, "f16", progress=False)
    text = tmp_path / "t.txt"
    text.write_text("A short story about a lighthouse keeper and his cat. " * 40)
    res = CliRunner().invoke(main, ["eval", "perplexity", str(gguf_path), "--text", str(text), "--ctx", "64",
                                    "--hf", str(src), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["engine"] for r in rows] == ["llama.cpp", "transformers"]
    assert abs(rows[0]["ppl"] / rows[1]["ppl"] - 1) < 0.005
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--text", str(empty)], "e.txt: the text is empty"),
        (["--text", str(text), "--ctx", "4096"], "--ctx 4096 is longer than the model's context length 256"),
        (["--text", str(tmp_path / "none.txt")], "none.txt: no such file"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(main, ["eval", "perplexity", str(gguf_path), *args, "--quiet"])
        assert res.exit_code == 2 and needle in res.output, res.output
    res = CliRunner().invoke(main, ["eval", "perplexity", str(tmp_path / "no.gguf"), "--text", str(text)])
    assert res.exit_code == 2 and "no.gguf: no such model file" in res.output
    short = tmp_path / "s.txt"
    short.write_text("just a few words")
    res = CliRunner().invoke(main, ["eval", "perplexity", str(gguf_path), "--text", str(short), "--ctx", "64"])
    assert res.exit_code == 2 and "fewer than one window of --ctx 64" in res.output


@pytest.mark.skipif(not (SHARED / "wikitext-2-raw" / "wiki.test.raw").is_file(),
                    reason="../shared/data/wikitext-2-raw is absent")
def test_wikitext_windows_on_real_data(checkpoints, tmp_path):
    src, _ = checkpoints["small"]
    gguf_path = tmp_path / "m.gguf"
    convert(src, gguf_path, "f16", progress=False)
    text = (SHARED / "wikitext-2-raw" / "wiki.test.raw").read_text()[:60000]
    r = llama_perplexity(gguf_path, text, 256, max_windows=3)
    assert r.windows == 3 and r.tokens_scored == 3 * 127
    # the same windows of real text scored by transformers on the checkpoint (f16 weights: 1 %)
    ref = hf_perplexity(src, text, 256, max_windows=3)
    assert ref.tokens_scored == r.tokens_scored and abs(r.ppl / ref.ppl - 1) < 1e-2


def test_literal_endoftext_is_plain_text_everywhere(checkpoints, tmp_path):
    """A text holding the string <|endoftext|> (as corpora joined by it do) is one token stream for
    llama.cpp (special tokens not parsed, as llama-perplexity reads text), transformers and the
    n-gram baselines: same count, same ids, so every engine scores the same windows."""
    from gpt2cube.eval.llama_runner import load_llama
    from gpt2cube.tokenizers import encode_text, hf_tokenizer

    src, _ = checkpoints["small"]
    gguf_path = tmp_path / "m.gguf"
    convert(src, gguf_path, "f32", progress=False)
    text = "The end of one story.<|endoftext|>A new story begins here, and it goes on. " * 20
    llm = load_llama(gguf_path, n_ctx=64)
    try:
        ours = list(llm.tokenize(text.encode(), add_bos=False, special=False))
    finally:
        llm.close()
    plain = encode_text(hf_tokenizer(), text)
    assert plain == ours and 50256 not in plain  # five ordinary tokens, never the EOT id
    t = tmp_path / "eot.txt"
    t.write_text(text)
    res = CliRunner().invoke(main, ["eval", "perplexity", str(gguf_path), "--text", str(t), "--ctx", "64", "--hf", str(src),
                                    "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["text_tokens"] == rows[1]["text_tokens"] == len(plain)
    assert abs(rows[0]["ppl"] / rows[1]["ppl"] - 1) < 5e-3
