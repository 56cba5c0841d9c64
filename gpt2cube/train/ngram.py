"""N-gram language models on the GPT-2 token stream: modified Kneser-Ney (the standard, as
KenLM's lmplz estimates it), interpolated Kneser-Ney with one discount, and a simple
absolute-discount backoff, orders 1..5, scored with the same perplexity definition as
`gpt2cube eval perplexity` (same windows, same scored tokens).

Counting is vectorised: a context of up to four tokens packs exactly into a uint64 (16 bits per
token; GPT-2 ids are < 65536); per order, contexts are numbered by `np.unique` and an n-gram is
(context number << 16 | word), again one uint64. Lookups are `searchsorted` on sorted keys.

Interpolated Kneser-Ney (Chen & Goodman's interpolated form, one discount per order,
D = n1 / (n1 + 2 n2) from that order's count-of-counts):
    P_N(w | h)  = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * P_{N-1}(w | h')
    lower orders use continuation counts N1+(. h w) in place of c(h w) (and their sums),
    P_1(w)      = max(N1+(. w) - D, 0) / N1+(. .) + D * |{w}| / N1+(. .) / V    (uniform floor)
    a context never seen passes the lower-order probability through unchanged.
Modified Kneser-Ney (Chen & Goodman 1998, interpolated; what lmplz estimates) is the same with
three discounts per order, by the (continuation) count being discounted:
    D(c) = D1 if c = 1, D2 if c = 2, D3+ if c >= 3, with Y = n1 / (n1 + 2 n2),
    D1 = 1 - 2 Y n2 / n1,  D2 = 2 - 3 Y n3 / n2,  D3+ = 3 - 4 Y n4 / n3
    (n_i: that order's number of n-grams with count i), and the lower-order weight of context h
    gamma(h) = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / c(h).
    When an order lacks counts of 1 to 4 (tiny corpora) the formulas are undefined (lmplz stops
    there): that order falls back to the single discount n1 / (n1 + 2 n2) for every count.
Backoff (Katz-style with absolute discounting, raw counts at every order):
    P(w | h) = (c(h w) - D) / c(h)                         if c(h w) > 0
             = alpha(h) * P(w | h')                         otherwise,
    alpha(h) = (D * N1+(h .) / c(h)) / (1 - sum_{w: c(h w) > 0} P(w | h'))   (sums to 1);
    a context after which every vocabulary word was seen keeps c(h w) / c(h) undiscounted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..eval.perplexity import perplexity

MAX_ORDER = 5
METHODS = ("mkn", "kn", "backoff")
# With no count-2 n-grams D = n1 / (n1 + 2 n2) is 1, and a singleton's backoff estimate
# (c - D) / c(h) would be 0; interpolated KN survives that (it adds the lower order), backoff not.
BACKOFF_MAX_DISCOUNT = 0.95


def pack(tokens: np.ndarray, start: np.ndarray, length: int) -> np.ndarray:
    """uint64 keys of tokens[start : start + length] (length <= 4), one per start."""
    key = np.zeros(len(start), dtype=np.uint64)
    for j in range(length):
        key |= tokens[start + j].astype(np.uint64) << np.uint64(16 * j)
    return key


@dataclass
class _Order:
    """Tables of one order k >= 2: contexts of k-1 tokens and n-grams (context id, word)."""

    ctx_keys: np.ndarray    # sorted unique packed contexts
    ctx_total: np.ndarray   # c(h) (or continuation total), per context
    ctx_types: np.ndarray   # N1+(h .): distinct words seen after h
    gram_keys: np.ndarray   # sorted (ctx id << 16 | w)
    gram_count: np.ndarray  # c(h w) (or continuation count)
    discount: float         # the single discount (kn, backoff)
    discounts: np.ndarray   # (D for count 0 = 0, D1, D2, D3+): per count, mkn (all = discount for kn)
    ctx_mass: np.ndarray    # sum over words seen after h of D(c(h w)): gamma(h) * c(h)
    alpha_norm: np.ndarray | None = None  # backoff: 1 - sum of lower-order mass of seen words


def _discount(counts: np.ndarray) -> float:
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + n2 > 0 and n1 > 0 else 0.5


def _modified_discounts(counts: np.ndarray) -> np.ndarray | None:
    """(0, D1, D2, D3+) by Chen & Goodman's estimates, or None when n1..n4 are not all positive."""
    n = [int((counts == i).sum()) for i in (1, 2, 3, 4)]
    if min(n) == 0:
        return None
    y = n[0] / (n[0] + 2 * n[1])
    d = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]
    return np.array([0.0] + [min(max(x, 0.0), i + 1.0) for i, x in enumerate(d)])


def _discount_table(counts: np.ndarray, modified: bool) -> tuple[float, np.ndarray]:
    single = _discount(counts)
    table = _modified_discounts(counts) if modified else None
    return single, table if table is not None else np.array([0.0, single, single, single])


def _discount_of(table: np.ndarray, c: np.ndarray) -> np.ndarray:
    return table[np.minimum(c, 3).astype(np.int64)]


class NGramModel:
    def __init__(self, order: int, method: str = "mkn", vocab_size: int = 50257) -> None:
        if not 1 <= order <= MAX_ORDER:
            raise InputError(f"--order {order}; expected 1 to {MAX_ORDER}")
        if method not in METHODS:
            raise InputError(f"method {method!r}; expected one of {', '.join(METHODS)}")
        self.order, self.method, self.V = order, method, vocab_size
        self.orders: dict[int, _Order] = {}

    # ---- counting -------------------------------------------------------------------------
    def fit(self, tokens: np.ndarray) -> "NGramModel":
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) < self.order:
            raise InputError(f"the training text has {len(t)} tokens; order {self.order} needs at least {self.order}")
        if t.max() >= self.V:
            raise InputError(f"token id {int(t.max())} is outside the vocabulary of {self.V}")
        kn = self.method in ("kn", "mkn") and self.order > 1
        # unigram: raw counts, or continuation counts N1+(. w) for KN
        if kn:
            big = np.unique(t[:-1] * self.V + t[1:])
            uni = np.bincount(big % self.V, minlength=self.V)
        else:
            uni = np.bincount(t, minlength=self.V)
        self.uni_count = uni.astype(np.float64)
        self.uni_total = float(uni.sum())
        self.uni_types = int((uni > 0).sum())
        self.uni_D, self.uni_table = _discount_table(uni[uni > 0], self.method == "mkn")
        self.uni_mass = float(_discount_of(self.uni_table, uni[uni > 0]).sum())
        for k in range(2, self.order + 1):
            starts = np.arange(len(t) - k + 1)
            ctx = pack(t, starts, k - 1)
            word = t[starts + k - 1]
            if kn and k < self.order:
                # continuation counts: distinct left extensions of each k-gram
                left = np.arange(len(t) - k)
                ext_ctx = pack(t, left, k)  # (k)-token context of the (k+1)-gram
                ext = np.unique(np.stack([ext_ctx, t[left + k].astype(np.uint64)]), axis=1)
                # suffix k-gram of each distinct (k+1)-gram: drop its first token
                ctx = ext[0] >> np.uint64(16)
                word = ext[1].astype(np.int64)
            self.orders[k] = self._tables(ctx, word)
        if self.method == "backoff":
            self._backoff_norms(t)
        return self

    def _tables(self, ctx: np.ndarray, word: np.ndarray) -> _Order:
        ctx_keys, ctx_id = np.unique(ctx, return_inverse=True)
        grams, counts = np.unique((ctx_id.astype(np.uint64) << np.uint64(16)) | word.astype(np.uint64),
                                  return_counts=True)
        gram_ctx = (grams >> np.uint64(16)).astype(np.int64)
        total = np.bincount(gram_ctx, weights=counts, minlength=len(ctx_keys))
        types = np.bincount(gram_ctx, minlength=len(ctx_keys))
        single, table = _discount_table(counts, self.method == "mkn")
        mass = np.bincount(gram_ctx, weights=_discount_of(table, counts), minlength=len(ctx_keys))
        return _Order(ctx_keys, total, types, grams, counts.astype(np.float64), single, table, mass)

    def _backoff_norms(self, t: np.ndarray) -> None:
        """alpha(h) denominators: 1 - sum over words seen after h of P_lower(w | h')."""
        for k in range(2, self.order + 1):
            o = self.orders[k]
            gram_ctx = (o.gram_keys >> np.uint64(16)).astype(np.int64)
            words = (o.gram_keys & np.uint64(0xFFFF)).astype(np.int64)
            # context tokens of each n-gram, unpacked from its context key
            ck = o.ctx_keys[gram_ctx]
            hist = np.stack([((ck >> np.uint64(16 * j)) & np.uint64(0xFFFF)).astype(np.int64)
                             for j in range(k - 1)], axis=1)
            lower = self._prob(hist[:, 1:], words, k - 1)  # uses BACKOFF_MAX_DISCOUNT like _prob
            o.alpha_norm = 1.0 - np.bincount(gram_ctx, weights=lower, minlength=len(o.ctx_keys))

    # ---- probabilities --------------------------------------------------------------------
    def _unigram(self, w: np.ndarray) -> np.ndarray:
        c = self.uni_count[w]
        return (np.maximum(c - _discount_of(self.uni_table, c), 0) + self.uni_mass / self.V) / self.uni_total

    def _lookup(self, o: _Order, hist: np.ndarray, w: np.ndarray):
        """(context index, seen, c(h), N1+(h .), c(h w)) for each row of hist (n, k-1)."""
        key = _pack_rows(hist)
        pos = np.searchsorted(o.ctx_keys, key)
        pos_c = np.minimum(pos, len(o.ctx_keys) - 1)
        seen = (len(o.ctx_keys) > 0) & (o.ctx_keys[pos_c] == key)
        gkey = (pos_c.astype(np.uint64) << np.uint64(16)) | w.astype(np.uint64)
        gpos = np.minimum(np.searchsorted(o.gram_keys, gkey), len(o.gram_keys) - 1)
        gseen = seen & (o.gram_keys[gpos] == gkey)
        c_hw = np.where(gseen, o.gram_count[gpos], 0.0)
        return pos_c, seen, o.ctx_total[pos_c], o.ctx_types[pos_c], c_hw

    def _prob(self, hist: np.ndarray, w: np.ndarray, order: int) -> np.ndarray:
        """P(w | last order-1 tokens of hist); hist is (n, >= order-1), most recent last."""
        p = self._unigram(w)
        if self.method in ("kn", "mkn"):
            for k in range(2, order + 1):
                o = self.orders[k]
                ci, seen, c_h, n_h, c_hw = self._lookup(o, hist[:, hist.shape[1] - (k - 1):], w)
                interp = (np.maximum(c_hw - _discount_of(o.discounts, c_hw), 0) + o.ctx_mass[ci] * p) / np.where(seen, c_h, 1)
                p = np.where(seen, interp, p)
            return p
        for k in range(2, order + 1):
            o = self.orders[k]
            ci, seen, c_h, n_h, c_hw = self._lookup(o, hist[:, hist.shape[1] - (k - 1):], w)
            D = min(o.discount, BACKOFF_MAX_DISCOUNT)
            safe_h = np.where(seen, c_h, 1)
            norm = o.alpha_norm[ci] if o.alpha_norm is not None else np.ones_like(p)
            full = norm <= 1e-12  # every word of the vocabulary followed h: nothing to back off to
            hit = (c_hw - np.where(full, 0.0, D)) / safe_h
            alpha = (D * n_h / safe_h) / np.where(full, 1, norm)
            p = np.where(seen & (c_hw > 0), hit, np.where(seen, alpha * p, p))
        return p

    def prob(self, hist: np.ndarray, w: np.ndarray) -> np.ndarray:
        hist = np.asarray(hist, dtype=np.int64).reshape(len(w), -1)
        return self._prob(hist, np.asarray(w, dtype=np.int64), self.order)

    def window_nll(self, window: np.ndarray) -> np.ndarray:
        """Negative log-likelihoods of the scored tokens of one perplexity window (see eval)."""
        ctx = len(window)
        first = ctx // 2
        if first < self.order - 1:
            raise InputError(f"--ctx {ctx} leaves less than order - 1 = {self.order - 1} tokens of history")
        idx = np.arange(first + 1, ctx)
        n = max(self.order - 1, 1)
        hist = np.stack([window[idx - n + j] for j in range(n)], axis=1)
        return -np.log(self.prob(hist, window[idx]))


def _pack_rows(hist: np.ndarray) -> np.ndarray:
    key = np.zeros(len(hist), dtype=np.uint64)
    for j in range(hist.shape[1]):
        key |= hist[:, j].astype(np.uint64) << np.uint64(16 * j)
    return key


def ngram_perplexity(model: NGramModel, tokens: np.ndarray, ctx: int = 512, max_windows: int | None = None):
    """The same windows and scored tokens as `gpt2cube eval perplexity`."""

    return perplexity(np.asarray(tokens, dtype=np.int64), ctx, None, f"{model.method}-{model.order}gram",
                      max_windows, scorer=model.window_nll)
