"""SMS spam classification with a GGUF model run by llama.cpp: the seed's baseline for fp vs
quantized vs fine-tuned models.

Data: the SMS Spam Collection format, one message per line, `ham|spam<TAB>text`. The collection
repeats messages (5,574 lines, 5,160 distinct texts), so it is deduplicated first (whitespace-
normalised exact match; a text seen under both labels is dropped) and no test message has a copy
in training. Then one of two seeded splits (`SPLITS`), named in every result:
 - stratified: each class shuffled with the seed, `test_fraction` of each to test, the rest train;
 - balanced: every spam plus as many ham drawn at random, shuffled, 70/10/20 train/validation/
   test, seed 123 by default: the recipe of the best-known public GPT-2 124M spam classifier
   (95.67 % test accuracy), applied to the deduplicated collection.
Two methods, both reported, spam = positive class:
 (a) prompted label likelihood: after a short prompt (optionally few-shot, examples drawn from
     the train split) the model's log-probabilities of the next tokens " spam" and " ham"
     (single GPT-2 tokens); the decision threshold on their difference is fitted on train
     messages (maximum F1), because raw label likelihoods of small models are biased; the
     model's own answer (threshold 0: " spam" more likely than " ham", what a fine-tuned model
     is trained to give) is reported beside it as `answer`;
 (b) linear probe: mean-pooled final hidden states from llama.cpp's embedding output,
     standardised, L2-regularised logistic regression fitted on the train split (numpy,
     Newton's method).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..gguf_file import model_context
from .llama_runner import load_llama

LABELS = ("ham", "spam")
PROMPT = "Is this SMS message spam or ham?\n"


@dataclass
class Message:
    label: int  # 1 = spam
    text: str


def _normalise(text: str) -> str:
    return " ".join(text.split())


def read_sms(path: Path) -> list[Message]:
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected the SMS Spam Collection (ham|spam<TAB>text per line)")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in LABELS or not text.strip():
            raise InputError(f"{path}:{n}: expected 'ham' or 'spam', a tab, then the message; got {line[:60]!r}")
        out.append(Message(LABELS.index(label), text.strip()))
    if not out:
        raise InputError(f"{path}: no messages")
    if len({m.label for m in out}) < 2:
        raise InputError(f"{path}: only one class present; expected both ham and spam")
    return out


@dataclass
class Dedup:
    messages: list[Message]
    lines: int
    duplicates: int   # repeated copies removed (same text, same label)
    conflicting: int  # texts seen under both labels, dropped entirely


def deduplicate(msgs: list[Message]) -> Dedup:
    """First occurrence of each whitespace-normalised text; texts labelled both ways are dropped."""
    labels: dict[str, set[int]] = {}
    for m in msgs:
        labels.setdefault(_normalise(m.text), set()).add(m.label)
    seen: set[str] = set()
    out = []
    for m in msgs:
        key = _normalise(m.text)
        if key not in seen and len(labels[key]) == 1:
            out.append(m)
        seen.add(key)
    conflicting = sum(len(v) > 1 for v in labels.values())
    conflicting_lines = sum(1 for m in msgs if len(labels[_normalise(m.text)]) > 1)
    return Dedup(out, len(msgs), len(msgs) - len(out) - conflicting_lines, conflicting)


@dataclass
class Split:
    name: str
    seed: int
    train: list[int]
    validation: list[int]
    test: list[int]

    def describe(self, msgs: list[Message]) -> dict:
        count = lambda idx: {"messages": len(idx), "spam": int(sum(msgs[i].label for i in idx))}  # noqa: E731
        return {"name": self.name, "seed": self.seed, "train": count(self.train),
                "validation": count(self.validation), "test": count(self.test)}


def stratified_split(msgs: list[Message], test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Each class contributes the same fraction to test; no validation part."""
    if not 0 < test_fraction < 1:
        raise InputError(f"--test-fraction {test_fraction}; expected a number between 0 and 1")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in (0, 1):
        idx = np.array([i for i, m in enumerate(msgs) if m.label == label])
        rng.shuffle(idx)
        k = max(1, int(round(len(idx) * test_fraction)))
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return Split("stratified", seed, sorted(train), [], sorted(test))


def balanced_split(msgs: list[Message], seed: int = 123, fractions: tuple[float, float] = (0.7, 0.1)) -> Split:
    """All spam plus an equal number of ham drawn at random, shuffled, then train / validation /
    test by `fractions` (the rest is test)."""
    rng = np.random.default_rng(seed)
    spam = [i for i, m in enumerate(msgs) if m.label == 1]
    ham = [i for i, m in enumerate(msgs) if m.label == 0]
    if len(ham) < len(spam):
        raise InputError(f"{len(ham)} ham messages for {len(spam)} spam; the balanced split needs at least as many ham")
    chosen = np.array(spam + rng.choice(ham, size=len(spam), replace=False).tolist())
    rng.shuffle(chosen)
    a = int(len(chosen) * fractions[0])
    b = a + int(len(chosen) * fractions[1])
    return Split("balanced", seed, sorted(chosen[:a].tolist()), sorted(chosen[a:b].tolist()), sorted(chosen[b:].tolist()))


SPLITS = {"stratified": "seeded stratified train/test (--test-fraction)",
          "balanced": "all spam + as many ham, 70/10/20 train/validation/test (seed 123 by default)"}


def make_split(msgs: list[Message], name: str, seed: int | None = None, test_fraction: float = 0.2) -> Split:
    if name == "stratified":
        return stratified_split(msgs, test_fraction, 0 if seed is None else seed)
    if name == "balanced":
        return balanced_split(msgs, 123 if seed is None else seed)
    raise InputError(f"split {name!r}; expected one of {', '.join(SPLITS)}")


def stratified_subsample(idx: list[int], msgs: list[Message], n: int, rng: np.random.Generator) -> list[int]:
    """n of `idx` with each class in its share (rounded, at least one of each present class)."""
    if n >= len(idx):
        return list(idx)
    by_class = [[i for i in idx if msgs[i].label == c] for c in (0, 1)]
    want = [round(n * len(b) / len(idx)) for b in by_class]
    for c in (0, 1):
        if by_class[c] and want[c] == 0:
            want[c], want[1 - c] = 1, want[1 - c] - 1
    return sorted(i for b, k in zip(by_class, want) for i in rng.choice(b, size=min(k, len(b)), replace=False).tolist())


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp, fp = int((y_true & y_pred).sum()), int((~y_true & y_pred).sum())
    fn, tn = int((y_true & ~y_pred).sum()), int((~y_true & ~y_pred).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(y_true), "precision": precision, "recall": recall, "f1": f1,
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}


def best_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """Threshold on scores (predict spam when score > t) maximising F1: the middle of the widest
    gap between consecutive scores where F1 is at its maximum (the largest margin on both sides,
    not the edge of the gap, which would sit on a calibration message's score)."""
    c = np.unique(scores)
    f1 = np.array([metrics(y, scores > t)["f1"] for t in c])
    best = np.flatnonzero(f1 == f1.max())
    upper = np.append(c[1:], c[-1] + 1.0)  # the last gap (everything ham) has no upper score
    k = best[np.argmax(upper[best] - c[best])]
    return float((c[k] + upper[k]) / 2)


def predict_proba(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(spam) for features x (n, d) under weights (d + 1,) with the bias last."""
    return 1 / (1 + np.exp(-np.clip(x @ w[:-1] + w[-1], -30, 30)))


def logistic_regression(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 25) -> np.ndarray:
    """Weights (d + 1,) with bias last; Newton's method on the L2-penalised log-loss."""
    X = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(X.shape[1])
    reg = np.full(X.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = predict_proba(x, w)
        grad = X.T @ (p - y) + reg * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def prompt_for(text: str, shots: list[Message]) -> str:
    demo = "".join(f"Message: {m.text}\nAnswer: {LABELS[m.label]}\n\n" for m in shots)
    return f"{PROMPT}\n{demo}Message: {text}\nAnswer:"


def label_scores(llm, texts: list[str], shots: list[Message], max_tokens: int) -> np.ndarray:
    """log P(" spam") - log P(" ham") as the next token after each prompt."""
    spam_id, ham_id = llm.tokenize(b" spam", add_bos=False)[0], llm.tokenize(b" ham", add_bos=False)[0]
    out = np.empty(len(texts))
    for i, text in enumerate(texts):
        toks = llm.tokenize(prompt_for(text, shots).encode("utf-8"), add_bos=False)[-max_tokens:]
        llm.reset()
        llm.eval(toks)
        logits = np.asarray(llm.scores[len(toks) - 1], dtype=np.float64)
        out[i] = logits[spam_id] - logits[ham_id]  # the log-softmax normaliser cancels
    return out


def embed_mean(llm, texts: list[str], max_tokens: int) -> np.ndarray:
    feats = []
    for text in texts:
        toks = llm.tokenize(text.encode("utf-8"), add_bos=False)[:max_tokens] or llm.tokenize(b" ", add_bos=False)
        llm.reset()
        e = np.asarray(llm.embed(llm.detokenize(toks).decode("utf-8", errors="replace")), dtype=np.float64)
        feats.append(e.mean(axis=0) if e.ndim == 2 else e)
    return np.vstack(feats)


def evaluate_spam(model: Path, data: Path, *, split: str = "stratified", test_fraction: float = 0.2,
                  seed: int | None = None, shots: int = 0, calib: int = 300, limit: int | None = None,
                  n_threads: int | None = None, progress: bool = False, probe: bool = True) -> dict:
    from tqdm import tqdm


    dedup = deduplicate(read_sms(data))
    msgs = dedup.messages
    parts = make_split(msgs, split, seed, test_fraction)
    train, test = parts.train, parts.test
    rng = np.random.default_rng(parts.seed + 1)
    if limit:  # a stratified subsample of the test split, for quick runs
        test = stratified_subsample(test, msgs, limit, rng)
    calib_idx = sorted(rng.choice(train, size=min(calib, len(train)), replace=False).tolist())
    shot_msgs = [msgs[i] for i in rng.choice(train, size=shots, replace=False)] if shots else []
    y_train = np.array([msgs[i].label for i in train])
    y_test = np.array([msgs[i].label for i in test])
    n_ctx = min(512, model_context(model))
    result: dict = {"model": str(model), "data": str(data),
                    "deduplication": {"lines": dedup.lines, "distinct_messages": len(msgs),
                                      "duplicates_removed": dedup.duplicates, "conflicting_texts_dropped": dedup.conflicting},
                    "split": parts.describe(msgs), "train": len(train), "test": len(test),
                    "test_spam": int(y_test.sum()), "seed": parts.seed, "shots": shots, "limit": limit}

    t0 = time.perf_counter()
    llm = load_llama(model, n_ctx=n_ctx, logits_all=True, n_threads=n_threads)
    try:
        bar = tqdm(total=len(calib_idx) + len(test), desc="spam: label likelihood", disable=not progress,
                   file=sys.stderr)
        cal = label_scores(llm, [msgs[i].text for i in calib_idx], shot_msgs, n_ctx - 1)
        bar.update(len(calib_idx))
        scores = label_scores(llm, [msgs[i].text for i in test], shot_msgs, n_ctx - 1)
        bar.update(len(test))
        bar.close()
    finally:
        llm.close()
    threshold = best_threshold(cal, np.array([msgs[i].label for i in calib_idx]))
    result["label_likelihood"] = {**metrics(y_test, scores > threshold), "threshold": threshold,
                                  "calibration_messages": len(calib_idx), "seconds": time.perf_counter() - t0,
                                  "answer": metrics(y_test, scores > 0)}

    if not probe:
        return result
    t0 = time.perf_counter()
    llm = load_llama(model, n_ctx=n_ctx, n_threads=n_threads, embedding=True)
    try:
        x_train = embed_mean(llm, [msgs[i].text for i in train], n_ctx)
        x_test = embed_mean(llm, [msgs[i].text for i in test], n_ctx)
    finally:
        llm.close()
    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    w = logistic_regression((x_train - mu) / sd, y_train)
    p = predict_proba((x_test - mu) / sd, w)
    result["linear_probe"] = {**metrics(y_test, p > 0.5), "seconds": time.perf_counter() - t0}
    return result
