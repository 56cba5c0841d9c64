"""N-gram baselines: normalisation, a hand-computed Kneser-Ney example, the closed-form unigram,
the shared perplexity definition, bad input, and the real corpus when present."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gpt2cube.cli import main
from gpt2cube.train.ngram import NGramModel, ngram_perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("method", ["mkn", "kn", "backoff"])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("V,n", [(6, 400), (9, 150)])  # dense: every word follows every context; sparse
def test_every_context_sums_to_one(method, order, V, n):
    rng = np.random.default_rng(order * 10 + V)
    t = rng.integers(0, V, size=n)
    t[::7] = 2
    m = NGramModel(order, method, V).fit(t)
    for h in itertools.product(range(V), repeat=max(order - 1, 1)):
        p = m.prob(np.array([h] * V), np.arange(V))
        assert np.all(p > 0)
        assert abs(p.sum() - 1) < 1e-12, (h, p.sum())


def test_kneser_ney_bigram_by_hand():
    # tokens 0 1 0 1 2: bigrams (0,1) x2, (1,0), (1,2); count-of-counts n1 = 2, n2 = 1 -> D2 = 1/2.
    # Continuation counts N1+(. w) = 1 for every w (3 bigram types), n1 = 3, n2 = 0 -> D1 = 1, so
    # P1(w) = (max(1 - 1, 0) + 1 * 3 / 3) / 3 = 1/3.
    m = NGramModel(2, "kn", 3).fit(np.array([0, 1, 0, 1, 2]))
    p = lambda h, w: float(m.prob(np.array([[h]]), np.array([w]))[0])  # noqa: E731
    assert math.isclose(p(0, 1), (2 - 0.5 + 0.5 * 1 / 3) / 2)   # c(0)=2, N1+(0 .)=1
    assert math.isclose(p(0, 0), (0.5 * 1 / 3) / 2)
    assert math.isclose(p(1, 0), (1 - 0.5 + 0.5 * 2 / 3) / 2)   # c(1)=2, N1+(1 .)=2
    assert math.isclose(p(1, 1), (0.5 * 2 / 3) / 2)
    assert math.isclose(p(2, 1), 1 / 3)                         # unseen context: the unigram


def test_unigram_perplexity_closed_form():
    # counts (2, 1, 1, 0) over N = 4; n1 = 2, n2 = 1 -> D = 1/2; 3 types seen, V = 4:
    # P(w) = (max(c - 1/2, 0) + 1/2 * 3/4) / 4 -> 0.46875, 0.21875, 0.21875, 0.09375
    m = NGramModel(1, "kn", 4).fit(np.array([0, 0, 1, 2]))
    assert np.allclose(m.prob(np.zeros((4, 0)), np.arange(4)), [0.46875, 0.21875, 0.21875, 0.09375])
    # ctx 4 scores the last token of each window (first = 2 predicts position 3)
    test = np.array([3, 3, 3, 0, 3, 3, 3, 3, 1, 1, 1, 2])
    r = ngram_perplexity(m, test, ctx=4)
    assert r.tokens_scored == 3
    assert math.isclose(r.ppl, (0.46875 * 0.09375 * 0.21875) ** (-1 / 3))


def test_backoff_uses_higher_order_when_seen():
    t = np.array([0, 1, 2] * 30 + [0, 2])
    m = NGramModel(3, "backoff", 5).fit(t)
    seen = float(m.prob(np.array([[0, 1]]), np.array([2]))[0])
    assert seen > 0.9
    assert float(m.prob(np.array([[4, 4]]), np.array([2]))[0]) < seen  # unseen context backs off


def test_cli_ngram_and_errors(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat. the dog sat on the log. " * 200)
    test = tmp_path / "test.txt"
    test.write_text("the cat sat on the log. the dog sat on the mat. " * 40)
    res = CliRunner().invoke(main, ["baseline", "ngram", "--order", "3", "--train", str(train), "--test", str(test),
                                    "--ctx", "64", "--json"])
    assert res.exit_code == 0, res.output
    assert '"engine": "mkn-3gram"' in res.stdout
    res = CliRunner().invoke(main, ["baseline", "ngram", "--order", "7", "--train", str(train), "--test", str(test)])
    assert res.exit_code == 2 and "7 is not in the range 1<=x<=5" in res.output
    res = CliRunner().invoke(main, ["baseline", "ngram", "--order", "2", "--train", str(tmp_path / "no"), "--test", str(test)])
    assert res.exit_code == 2 and "no: no such file or directory" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = CliRunner().invoke(main, ["baseline", "ngram", "--order", "2", "--train", str(train), "--test", str(empty)])
    assert res.exit_code == 2 and "empty.txt: the text is empty" in res.output


@pytest.mark.skipif(not (SHARED / "gutenberg" / "books").is_dir(), reason="../shared/data/gutenberg is absent")
def test_higher_orders_help_on_real_books():
    from gpt2cube.tokenizers import hf_tokenizer

    books = SHARED / "gutenberg" / "books"
    tok = hf_tokenizer()
    train = np.array(tok.encode((books / "pg11.txt").read_text()[:300_000]))
    test = np.array(tok.encode((books / "pg35.txt").read_text()[:40_000]))
    ppl = {n: ngram_perplexity(NGramModel(n, "mkn").fit(train), test, ctx=128).ppl for n in (1, 2, 3)}
    kn3 = ngram_perplexity(NGramModel(3, "kn").fit(train), test, ctx=128).ppl
    assert ppl[1] > ppl[2] > ppl[3]  # each order helps on held-out text
    assert ppl[3] < kn3  # three discounts beat one (Chen & Goodman)


# ---- modified Kneser-Ney against a plain, independent re-derivation ------------------------------

def _mkn_reference(tokens: list[int], order: int, V: int):
    """Chen & Goodman's interpolated modified Kneser-Ney written out with dictionaries, sharing no
    code with gpt2cube.train.ngram: raw counts at the top order, continuation counts N1+(. h w)
    below it, three discounts per order from that order's count-of-counts."""
    from collections import Counter, defaultdict

    grams = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, order + 1)}
    counts: dict[int, dict[tuple, int]] = {order: dict(grams[order])}
    for k in range(1, order):
        left = defaultdict(set)
        for g in grams[k + 1]:
            left[g[1:]].add(g[0])
        counts[k] = {g: len(xs) for g, xs in left.items()}
    discounts, n_of = {}, {}
    for k, c in counts.items():
        n = [sum(1 for v in c.values() if v == i) for i in (1, 2, 3, 4)]
        n_of[k] = n
        y = n[0] / (n[0] + 2 * n[1])
        discounts[k] = (1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2])
    ctx_total, ctx_mass = defaultdict(float), defaultdict(float)
    for k, c in counts.items():
        for g, v in c.items():
            ctx_total[(k, g[:-1])] += v
            ctx_mass[(k, g[:-1])] += discounts[k][min(v, 3) - 1]

    def prob(hist: tuple, w: int, k: int = order) -> float:
        if k == 1:
            c = counts[1].get((w,), 0)
            d = discounts[1][min(c, 3) - 1] if c else 0.0
            return (max(c - d, 0) + ctx_mass[(1, ())] / V) / ctx_total[(1, ())]
        h = tuple(hist[len(hist) - (k - 1):])
        lower = prob(hist, w, k - 1)
        total = ctx_total.get((k, h), 0.0)
        if total == 0:
            return lower
        c = counts[k].get(h + (w,), 0)
        d = discounts[k][min(c, 3) - 1] if c else 0.0
        return (max(c - d, 0) + ctx_mass[(k, h)] * lower) / total

    return prob, n_of, discounts


def test_modified_kneser_ney_equals_an_independent_derivation():
    V, order = 150, 4
    rng = np.random.default_rng(5)
    # each token follows one of two fixed successors, or is drawn from a Zipf vocabulary: counts
    # (and continuation counts) of 1, 2, 3 and 4 at every order
    zipf = 1 / np.arange(1, V + 1) ** 1.1
    succ = rng.integers(0, V, size=(V, 2))
    toks = [0]
    for _ in range(4000):
        toks.append(int(succ[toks[-1], rng.integers(2)]) if rng.random() < 0.6 else int(rng.choice(V, p=zipf / zipf.sum())))
    prob, n_of, discounts = _mkn_reference(toks, order, V)
    for k in range(1, order + 1):
        assert min(n_of[k]) > 0, (k, n_of[k])  # the three-discount formulas apply at every order
    m = NGramModel(order, "mkn", V).fit(np.array(toks))
    assert np.allclose(m.uni_table[1:], discounts[1], rtol=0, atol=1e-12)
    for k in range(2, order + 1):
        assert np.allclose(m.orders[k].discounts[1:], discounts[k], rtol=0, atol=1e-12), k
    # every word after seen histories (from the corpus) and unseen ones (random)
    hists = [tuple(toks[i:i + order - 1]) for i in rng.integers(0, len(toks) - order, 40)]
    hists += [tuple(int(x) for x in rng.integers(0, V, order - 1)) for _ in range(40)]
    H = np.repeat(np.array(hists), V, axis=0)
    W = np.tile(np.arange(V), len(hists))
    got = m.prob(H, W)
    want = np.array([prob(h, int(w)) for h, w in zip(map(tuple, H.tolist()), W)])
    assert np.allclose(got, want, rtol=1e-12, atol=0)
    assert np.allclose(got.reshape(len(hists), V).sum(axis=1), 1.0, atol=1e-12)


def test_modified_discounts_differ_from_the_single_one():
    """On real-looking counts the three discounts are distinct and grow with the count, the
    reason modified KN beats one discount."""
    rng = np.random.default_rng(0)
    toks = rng.zipf(1.3, size=20000) % 500
    m = NGramModel(3, "mkn", 500).fit(toks)
    d = m.orders[3].discounts
    assert 0 < d[1] < d[2] < d[3] < 3
    assert NGramModel(3, "kn", 500).fit(toks).orders[3].discounts[1:].tolist() == [m.orders[3].discount] * 3
