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
from gpt2cube.eval.hellaswag import ending_scores, read_hellaswag, subset
from gpt2cube.eval.spam import (
    Message,
    balanced_split,
    best_threshold,
    deduplicate,
    logistic_regression,
    metrics,
    read_sms,
    stratified_split,
    stratified_subsample,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HAM = ["Are we still meeting for lunch today?", "Call me when you get home", "I'll be late, traffic is bad",
       "Thanks for the birthday wishes!", "Can you pick up milk on the way?", "See you at the game tonight"]
SPAM = ["WINNER!! Claim your free prize now, call 09061701461", "Free entry in a weekly competition, text WIN to 80086",
        "URGENT! Your mobile has won a cash award of 2000 GBP", "You have been selected for a free cruise, reply YES"]


PEOPLE = ["Anna", "Ben", "mum", "Dave", "Sue"]
PLACES = ["the station", "Tesco", "work", "the gym", "home", "uni"]
PRIZES = ["a 500 GBP voucher", "a free Nokia phone", "2 cinema tickets", "a holiday to Spain"]
NUMBERS = ["87121", "09050001808", "80062", "84025"]


def _sms_lines() -> list[str]:
    """30 distinct ham and 12 distinct spam texts (no near-copies across classes), plus 4 exact
    repeats, 2 whitespace variants and one text filed under both labels."""
    ham = [f"ham\t{HAM[i % 6].rstrip('?!.')}, {PEOPLE[i % 5]}? I'm at {PLACES[i % 6]}" for i in range(30)]
    spam = [f"spam\t{SPAM[i % 4].split(',')[0]}: win {PRIZES[i % 4]}, text {NUMBERS[(i // 4) % 4]} now" for i in range(12)]
    dup = [ham[0], ham[1], spam[0], spam[3], ham[2].replace(" I'm", "  I'm"), spam[5] + "  "]
    both = ["ham\tok see you there", "spam\tok see you there"]
    return ham + spam + dup + both


@pytest.fixture
def sms_file(tmp_path) -> Path:
    p = tmp_path / "SMSSpamCollection"
    p.write_text("\n".join(_sms_lines()) + "\n")
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


def test_threshold_is_the_middle_of_the_widest_best_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    # separable: every threshold in [-2, 1) gives F1 1; the middle is -0.5, not -2 (a ham's score)
    assert best_threshold(np.array([-5.0, -3.0, -2.0, 1.0, 2.0, 4.0]), y) == -0.5
    # not separable: F1 peaks (6/7) for t in [-3, 0), the ham at 0.5 above it; the middle is -1.5
    scores = np.array([-4.0, -3.0, 0.5, 0.0, 3.0, 5.0])
    assert best_threshold(scores, y) == -1.5
    assert metrics(y, scores > -1.5)["f1"] == max(metrics(y, scores > t)["f1"] for t in scores)


def test_split_is_stratified_and_reproducible():
    msgs = [Message(int(i % 5 == 0), f"m{i}") for i in range(100)]  # 20 spam
    sp = stratified_split(msgs, 0.2, seed=3)
    assert sorted(sp.train + sp.test) == list(range(100)) and not set(sp.train) & set(sp.test)
    assert sum(msgs[i].label for i in sp.test) == 4 and len(sp.test) == 20 and sp.validation == []
    assert stratified_split(msgs, 0.2, seed=3) == sp
    assert stratified_split(msgs, 0.2, seed=4).test != sp.test


def test_deduplication_before_the_split(sms_file):
    d = deduplicate(read_sms(sms_file))
    assert d.lines == 50 and len(d.messages) == 42 and d.duplicates == 6 and d.conflicting == 1
    norm = lambda m: " ".join(m.text.split())  # noqa: E731
    assert len({norm(m) for m in d.messages}) == 42 and "ok see you there" not in {norm(m) for m in d.messages}
    for sp in (stratified_split(d.messages, 0.25, seed=1), balanced_split(d.messages, seed=2)):
        train = {norm(d.messages[i]) for i in sp.train}
        assert not train & {norm(d.messages[i]) for i in sp.test + sp.validation}


def test_balanced_split_recipe():
    msgs = [Message(int(i % 7 == 0), f"m{i}") for i in range(700)]  # 100 spam, 600 ham
    sp = balanced_split(msgs, seed=123)
    chosen = sp.train + sp.validation + sp.test
    assert len(chosen) == 200 and len(set(chosen)) == 200
    assert sum(msgs[i].label for i in chosen) == 100  # every spam and as many ham
    assert (len(sp.train), len(sp.validation), len(sp.test)) == (140, 20, 40)
    assert balanced_split(msgs, seed=123) == sp and balanced_split(msgs, seed=124).test != sp.test
    with pytest.raises(InputError, match="needs at least as many ham"):
        balanced_split([Message(1, "a"), Message(1, "b"), Message(0, "c")])


def test_limit_subsample_keeps_class_shares():
    msgs = [Message(int(i % 10 == 0), f"m{i}") for i in range(1000)]  # 10 % spam
    idx = list(range(0, 1000, 2))  # 500 messages, 100 spam (20 %)
    sub = stratified_subsample(idx, msgs, 60, np.random.default_rng(0))
    assert len(sub) == 60 and set(sub) <= set(idx) and sum(msgs[i].label for i in sub) == 12
    few = stratified_subsample(idx, msgs, 2, np.random.default_rng(0))  # 0.4 spam rounds to 0
    assert sum(msgs[i].label for i in few) == 1  # a class present in the split stays present


def test_logistic_regression_separates_separable_data():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(-2, 1, (50, 3)), rng.normal(2, 1, (50, 3))])
    y = np.array([0] * 50 + [1] * 50)
    w = logistic_regression(x, y, l2=0.1)
    assert ((np.hstack([x, np.ones((100, 1))]) @ w > 0) == y).mean() >= 0.98


def test_sms_format_errors_name_the_line(tmp_path, sms_file):
    assert len(read_sms(sms_file)) == 50
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
    # 42 distinct messages (30 ham, 12 spam): 20 % of each class to test
    assert r["deduplication"] == {"lines": 50, "distinct_messages": 42, "duplicates_removed": 6,
                                  "conflicting_texts_dropped": 1}
    assert r["split"]["name"] == "stratified" and r["split"]["test"] == {"messages": 8, "spam": 2}
    assert r["test"] == 8 and r["test_spam"] == 2
    for method in ("label_likelihood", "linear_probe"):
        m = r[method]
        c = m["confusion"]
        assert c["tp"] + c["fn"] == 2 and c["fp"] + c["tn"] == 6
        assert m["accuracy"] == (c["tp"] + c["tn"]) / 8
    a = r["label_likelihood"]["answer"]  # the model's own answer, threshold 0
    assert a["confusion"]["tp"] + a["confusion"]["fn"] == 2 and 0 <= a["f1"] <= 1
    # spam and ham are lexically far apart: even a random model's mean-pooled features separate
    # messages it never saw in training (no copies across the split after deduplication)
    # and better than either constant answer (6 ham + 2 spam: "always ham" scores 0.75): it must
    # catch a spam message and keep most ham
    c = r["linear_probe"]["confusion"]
    assert c["tp"] >= 1 and c["tn"] >= 5, c
    res = CliRunner().invoke(main, ["eval", "spam", str(small_gguf), "--data", str(sms_file), "--quiet",
                                    "--threads", "1", "--split", "balanced", "--limit", "4"])
    assert res.exit_code == 0, res.output
    assert "balanced split, seed 123: train 16 (" in res.output and "scored: 4 test messages" in res.output


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


def test_hellaswag_end_to_end_equals_transformers(checkpoints, tmp_path):
    """The accuracy llama.cpp gives equals the one computed independently with transformers on
    the same checkpoint (f32 file; mean log-probability of each ending after the shared prefix)."""
    import torch

    from gpt2cube.tokenizers import hf_tokenizer

    src, hf = checkpoints["small"]
    f32 = tmp_path / "small-f32.gguf"
    convert(src, f32, "f32", progress=False)
    rng = np.random.default_rng(0)
    words = "the a man woman dog walks runs into house garden slowly then he she it table".split()
    tasks = []
    for i in range(12):
        tasks += [f"Task {i}: " + " ".join(rng.choice(words, 8)), str(i % 4)]
        tasks += [" ".join(rng.choice(words, int(rng.integers(2, 7)))) for _ in range(4)]
    data = tmp_path / "hs.txt"
    data.write_text("\n".join(tasks) + "\n")
    res = CliRunner().invoke(main, ["eval", "hellaswag", str(f32), "--data", str(data), "--json", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    tok = hf_tokenizer()
    correct = 0
    for t in read_hellaswag(data):
        seqs = [tok.encode(f"{t.context} {e}") for e in t.endings]
        k = 0
        while k < min(map(len, seqs)) - 1 and all(s[k] == seqs[0][k] for s in seqs):
            k += 1
        scores = []
        for s in seqs:
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([s])).logits[0].double(), -1)
            scores.append(float(np.mean([lp[j - 1, s[j]].item() for j in range(max(k, 1), len(s))])))
        correct += int(np.argmax(scores) == t.gold)
    assert r["tasks"] == 12 and r["split"] == "validation"
    assert r["accuracy"] == correct / 12


def test_hellaswag_limit_is_a_seeded_random_subset(hellaswag_file, tmp_path):
    tasks = [t for t in read_hellaswag(hellaswag_file) for _ in range(20)]
    for i, t in enumerate(tasks):
        t.context = f"{i}"
    a = subset(tasks, 5, seed=1)
    assert len(a) == 5 and [t.context for t in a] == sorted((t.context for t in a), key=int)
    assert subset(tasks, 5, seed=1) == a and subset(tasks, 5, seed=2) != a
    assert [t.context for t in a] != [str(i) for i in range(5)]  # not the first N
    assert subset(tasks, None, 0) == tasks and subset(tasks, 100, 0) == tasks
    with pytest.raises(InputError, match="--limit 0"):
        subset(tasks, 0, 0)


def test_sample_quality_measures_by_hand():
    toks = [[1, 2, 3, 1, 2], [4, 4, 4]]
    assert distinct_n(toks, 1) == 4 / 8
    assert distinct_n(toks, 2) == 4 / 6  # (1,2) (2,3) (3,1) (1,2) (4,4) (4,4) -> 4 distinct of 6
    assert repetition_rate(toks) == (2 + 2) / (4 + 2)  # 1 and 2 repeat in the first; 4, 4 in the second


def test_generate_and_bench_run(small_gguf, checkpoints, tmp_path):
    import torch

    from gpt2cube.tokenizers import hf_tokenizer

    src, hf = checkpoints["small"]
    ref = tmp_path / "ref-f32.gguf"
    convert(src, ref, "f32", progress=False)
    prompt = "Once upon a time"
    res = CliRunner().invoke(main, ["generate", str(small_gguf), "--prompt", prompt, "--n-tokens", "12",
                                    "--quality", "--reference", str(ref), "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert len(r["samples"]) == 1 and r["samples"][0]["text"]
    # the samples' perplexity under the reference, recomputed with transformers on its checkpoint
    tok = hf_tokenizer()
    pt, st = tok.encode(prompt), tok.encode(r["samples"][0]["text"])
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([pt + st])).logits[0].double(), -1)
    want = float(np.exp(-np.mean([lp[len(pt) + j - 1, t].item() for j, t in enumerate(st)])))
    assert abs(r["reference_ppl"] / want - 1) < 5e-3  # f32 file in llama.cpp vs transformers
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
