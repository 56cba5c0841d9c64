"""Spam classification, HellaSwag, generation quality, bench and compare: the logic on
hand-made cases, end to end on small fixtures, and the real data sets when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.errors import InputError
from gpt2cube.eval.generate import distinct_n, repetition_rate
from gpt2cube.eval.hellaswag import ending_scores, read_hellaswag
from gpt2cube.eval.spam import Message, logistic_regression, metrics, read_sms, stratified_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HAM = ["Are we still meeting for lunch today?", "Call me when you get home", "I'll be late, traffic is bad",
       "Thanks for the birthday wishes!", "Can you pick up milk on the way?", "See you at the game tonight"]
SPAM = ["WINNER!! Claim your free prize now, call 09061701461", "Free entry in a weekly competition, text WIN to 80086",
        "URGENT! Your mobile has won a cash award of 2000 GBP", "You have been selected for a free cruise, reply YES"]


@pytest.fixture
def sms_file(tmp_path) -> Path:
    lines = [f"ham\t{HAM[i % len(HAM)]} ({i})" for i in range(30)] + [f"spam\t{SPAM[i % len(SPAM)]} #{i}" for i in range(10)]
    p = tmp_path / "SMSSpamCollection"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def hellaswag_file(tmp_path) -> Path:
    p = tmp_path / "hs.txt"
    p.write_text("Baking: The woman puts flour in the bowl. She\n1\nflies to the moon.\nstirs the flour with a spoon.\n"
                 "sings to the cat.\nreads a newspaper.\nSwimming: A boy jumps into the pool. He\n0\nswims to the other side.\n"
                 "eats a sandwich.\nclimbs a tree.\nwrites a letter.\n")
    return p


@pytest.fixture(scope="module")
def small_gguf(checkpoints, tmp_path_factory) -> Path:
    src, _ = checkpoints["small"]
    out = tmp_path_factory.mktemp("eval") / "small-f16.gguf"
    convert(src, out, "f16", progress=False)
    return out


def test_metrics_on_hand_made_confusion_matrix():
    y_true = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    y_pred = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0])  # tp 3, fn 2, fp 1, tn 4
    m = metrics(y_true, y_pred)
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    assert m["accuracy"] == 0.7 and m["precision"] == 0.75 and m["recall"] == 0.6
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert metrics([0, 0], [0, 0])["f1"] == 0.0  # no positives: defined as 0, no division error


def test_split_is_stratified_and_reproducible():
    msgs = [Message(int(i % 5 == 0), f"m{i}") for i in range(100)]  # 20 spam
    train, test = stratified_split(msgs, 0.2, seed=3)
    assert sorted(train + test) == list(range(100)) and not set(train) & set(test)
    assert sum(msgs[i].label for i in test) == 4 and len(test) == 20
    assert stratified_split(msgs, 0.2, seed=3) == (train, test)
    assert stratified_split(msgs, 0.2, seed=4)[1] != test


def test_logistic_regression_separates_separable_data():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(-2, 1, (50, 3)), rng.normal(2, 1, (50, 3))])
    y = np.array([0] * 50 + [1] * 50)
    w = logistic_regression(x, y, l2=0.1)
    assert ((np.hstack([x, np.ones((100, 1))]) @ w > 0) == y).mean() >= 0.98


def test_sms_format_errors_name_the_line(tmp_path, sms_file):
    assert len(read_sms(sms_file)) == 40
    bad = tmp_path / "bad"
    bad.write_text("ham\thello\nspam\tbuy now\nmaybe\tsomething\n")
    with pytest.raises(InputError, match=r"bad:3: expected 'ham' or 'spam', a tab"):
        read_sms(bad)
    one = tmp_path / "one"
    one.write_text("ham\thello\nham\tthere\n")
    with pytest.raises(InputError, match="only one class"):
        read_sms(one)


def test_spam_both_methods_end_to_end(small_gguf, sms_file):
    res = CliRunner().invoke(main, ["eval", "spam", str(small_gguf), "--data", str(sms_file), "--json", "--quiet",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["test"] == 8 and r["test_spam"] == 2
    for method in ("label_likelihood", "linear_probe"):
        m = r[method]
        assert sum(m["confusion"].values()) == 8
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["f1"] <= 1 and m["seconds"] > 0
    # spam and ham are lexically far apart: even a random model's features separate them
    assert r["linear_probe"]["accuracy"] >= 0.75


def test_hellaswag_parsing_and_errors(tmp_path, hellaswag_file):
    tasks = read_hellaswag(hellaswag_file)
    assert len(tasks) == 2 and tasks[0].gold == 1 and tasks[0].endings[1] == "stirs the flour with a spoon."
    assert tasks[1].context.startswith("Swimming:")
    bad = tmp_path / "bad.txt"
    bad.write_text(hellaswag_file.read_text().replace("\n0\n", "\nX\n"))
    with pytest.raises(InputError, match=r"bad.txt:8: gold ending index 'X'"):
        read_hellaswag(bad)
    short = tmp_path / "short.txt"
    short.write_text("a\n1\nb\nc\n")
    with pytest.raises(InputError, match="not a multiple of 6"):
        read_hellaswag(short)


def test_hellaswag_scoring_is_length_normalised():
    # ending 0: four tokens at -1 (sum -4, mean -1); ending 1: one token at -3 (sum -3, mean -3)
    lps = [np.array([0, -9, -1, -1, -1, -1.0]), np.array([0, -9, -3.0]), np.array([0, -9, -5, -5.0]),
           np.array([0, -9, -2, -2.0])]
    scores = ending_scores(lps, prefix=2)  # positions before 2 are the shared context
    assert np.argmax(scores) == 0  # summed log-probabilities would pick ending 1
    assert scores.tolist() == [-1.0, -3.0, -5.0, -2.0]


def test_hellaswag_end_to_end(small_gguf, hellaswag_file):
    res = CliRunner().invoke(main, ["eval", "hellaswag", str(small_gguf), "--data", str(hellaswag_file), "--json",
                                    "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["tasks"] == 2 and r["accuracy"] in (0.0, 0.5, 1.0)


def test_sample_quality_measures_by_hand():
    toks = [[1, 2, 3, 1, 2], [4, 4, 4]]
    assert distinct_n(toks, 1) == 4 / 8
    assert distinct_n(toks, 2) == 4 / 6  # (1,2) (2,3) (3,1) (1,2) (4,4) (4,4) -> 4 distinct of 6
    assert repetition_rate(toks) == (2 + 2) / (4 + 2)  # 1 and 2 repeat in the first; 4, 4 in the second


def test_generate_and_bench_run(small_gguf):
    res = CliRunner().invoke(main, ["generate", str(small_gguf), "--prompt", "Once upon a time", "--n-tokens", "12",
                                    "--quality", "--reference", str(small_gguf), "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert len(r["samples"]) == 1 and r["samples"][0]["text"]
    assert 0 < r["distinct_1"] <= 1 and r["reference_ppl"] > 1
    res = CliRunner().invoke(main, ["bench", str(small_gguf), "--n-prompt", "64", "--n-gen", "16", "--repeats", "2",
                                    "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    b = json.loads(res.stdout)
    assert b["pp_tok_s"] > 0 and b["tg_tok_s"] > 0 and b["load_s"] > 0 and 10 < b["peak_rss_mb"] < 4000
    assert len(b["pp_runs"]) == 2


def test_compare_writes_results_table_and_plots(checkpoints, small_gguf, sms_file, hellaswag_file, tmp_path):
    src, _ = checkpoints["small"]
    q8 = tmp_path / "small-q8_0.gguf"
    convert(src, q8, "q8_0", progress=False)
    text = tmp_path / "t.txt"
    text.write_text("The keeper of the lighthouse walked along the shore every evening. " * 30)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["compare", str(small_gguf), str(q8), "--out", str(out), "--text", str(text),
                                    "--hf", str(src), "--spam", str(sms_file), "--hellaswag", str(hellaswag_file),
                                    "--ctx", "64", "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == 1 and len(r["models"]) == 2
    for m in r["models"]:
        assert {"file_mb", "bits_per_weight", "perplexity", "spam", "hellaswag", "bench"} <= set(m)
    assert abs(r["models"][0]["perplexity"]["ppl"] / r["hf_reference"]["ppl"] - 1) < 0.005
    for png in ("size_vs_perplexity.png", "speed.png", "spam_f1.png"):
        assert (out / png).stat().st_size > 5000
    assert "| model |" in (out / "results.md").read_text() and "small-q8_0" in res.stdout


def test_missing_model_file(tmp_path):
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "none.gguf")])
    assert res.exit_code == 2 and "none.gguf: no such model file" in res.output


@pytest.mark.skipif(not (SHARED / "sms_spam" / "SMSSpamCollection").is_file(), reason="../shared/data/sms_spam is absent")
def test_real_sms_collection_parses():
    msgs = read_sms(SHARED / "sms_spam" / "SMSSpamCollection")
    assert len(msgs) == 5574 and sum(m.label for m in msgs) == 747


@pytest.mark.skipif(not (SHARED / "hellaswag" / "hellaswag_val_full.txt").is_file(),
                    reason="../shared/data/hellaswag is absent")
def test_real_hellaswag_parses():
    tasks = read_hellaswag(SHARED / "hellaswag" / "hellaswag_val_full.txt")
    assert len(tasks) == 10042 and all(len(t.endings) == 4 for t in tasks)
