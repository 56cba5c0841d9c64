"""What a fine-tune trains on: batches and the validation score that picks the checkpoint.

Two tasks, one interface (`batch(rng)`, `validate(forward)`):
 - `LMTask`: next-token prediction on random windows of a text corpus (files held out by name
   are the validation text, as `gpt2cube train` does; excluded files are read by neither, so a
   book kept for the final evaluation never picks the checkpoint);
 - `SpamTask`: supervised SMS spam as language modelling. Each example is exactly the prompt
   `gpt2cube eval spam` builds (`eval.spam.prompt_for`) followed by the label word (" spam" or
   " ham", one GPT-2 token each); the loss is the cross-entropy of that label token. The result
   stays a plain GPT-2 that llama.cpp runs and `eval spam` scores with the model answering.
   Only the training part of the deduplicated split is trained on; the split's validation
   part (balanced) or a seeded stratified tenth of its training part (stratified) picks the
   checkpoint; the test part is never read. With `lm_weight` a > 0 the training loss is
   (1 - a) * the label's CE + a * the mean next-token CE over the messages' own tokens (the
   fixed prompt text excluded): the model keeps modelling text, here SMS text, instead of
   collapsing onto the two label words, which keeps it a language model and regularises the
   classifier on a few thousand messages. Validation scores the label alone.
A batch is (input ids (B, T), the positions scored (N,) as flat indices into B*T, their targets
(N,)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..constants import GPT2_EOT_ID
from ..errors import InputError
from ..eval.spam import LABELS, deduplicate, make_split, metrics, prompt_for, read_sms, stratified_split
from ..tokenizers import encode_text
from ..train.data import corpus_files, load_tokens, split_holdout


@dataclass
class Batch:
    ids: "object"        # torch.LongTensor (B, T)
    scored: "object"     # torch.LongTensor (N,) flat positions into (B, T)
    targets: "object"    # torch.LongTensor (N,)
    tokens: int          # tokens in the batch (for the token count)
    weights: "object" = None  # torch.FloatTensor (N,) summing to 1; None: uniform over the scored positions


# nll(batch) -> mean cross-entropy at its scored positions; scored_logits(batch) -> (N, V) logits
NLL = Callable[[Batch], float]
ScoredLogits = Callable[[Batch], "object"]


class LMTask:
    name = "lm"

    def __init__(self, corpus: list[Path], holdout: list[Path], ctx: int, batch_size: int,
                 val_windows: int = 32, exclude: list[Path] | None = None) -> None:
        files = corpus_files(corpus)
        if exclude:  # left out of training and of validation (e.g. the book evaluated on afterwards)
            files, _ = split_holdout(files, exclude)
        train_files, val_files = split_holdout(files, holdout)
        if not train_files:
            raise InputError("every corpus file is held out; nothing is left to fine-tune on")
        self.train = load_tokens(train_files)
        if val_files:
            self.val = load_tokens(val_files)
        else:  # the last twentieth of the corpus, removed from training
            n = max(ctx * 16, len(self.train) // 20)
            self.train, self.val = self.train[:-n], self.train[-n:]
        for what, toks in (("fine-tuning corpus", self.train), ("validation text", self.val)):
            if len(toks) < ctx + 2:
                raise InputError(f"the {what} has {len(toks)} tokens, fewer than one window of --ctx {ctx} + 1")
        self.ctx, self.batch_size = ctx, batch_size
        n_val = min(val_windows, (len(self.val) - 1) // ctx)
        self.val_starts = (np.arange(n_val) * ((len(self.val) - ctx - 1) // max(1, n_val))).astype(np.int64)
        self.sizes = {"train_tokens": int(len(self.train)), "validation_tokens": int(len(self.val))}
        self.tokens_per_batch = batch_size * ctx

    def _windows(self, toks: np.ndarray, starts: np.ndarray, whole: int | None = None) -> Batch:
        """The windows at `starts`; weighed as a part of a batch of `whole` windows when given."""
        import torch

        idx = starts[:, None] + np.arange(self.ctx + 1)[None, :]
        xy = torch.from_numpy(toks[idx].astype(np.int64))
        n = xy.shape[0] * self.ctx
        weights = None if whole in (None, len(starts)) else torch.full((n,), 1.0 / (whole * self.ctx))
        return Batch(xy[:, :-1], torch.arange(n), xy[:, 1:].reshape(-1), n, weights)

    @property
    def capacity(self) -> int:
        return len(self.train) - self.ctx - 1

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """A global batch: n window starts."""
        return rng.integers(0, len(self.train) - self.ctx - 1, size=n)

    def micro(self, items: np.ndarray, lo: int, hi: int) -> Batch:
        """items[lo:hi] as a part of the global batch `items` (weights summing to its share)."""
        return self._windows(self.train, items[lo:hi], len(items))

    def tokens(self, items: np.ndarray) -> int:
        return len(items) * self.ctx

    def batch(self, rng: np.random.Generator) -> Batch:
        return self.micro(self.draw(rng, self.batch_size), 0, self.batch_size)

    def validate(self, nll: NLL, scored_logits: ScoredLogits) -> dict:
        losses = [nll(self._windows(self.val, self.val_starts[i : i + self.batch_size]))
                  for i in range(0, len(self.val_starts), self.batch_size)]
        loss = float(np.mean(losses))
        return {"val_loss": round(loss, 4), "val_ppl": round(float(np.exp(loss)), 3), "select": loss}


def label_token_ids(tokenizer) -> list[int]:
    ids = []
    for label in LABELS:
        toks = tokenizer(f" {label}", add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise InputError(f"the tokenizer splits the label {label!r} into {len(toks)} tokens; the spam task "
                             "needs one token per label (GPT-2's BPE has ' ham' and ' spam')")
        ids.append(toks[0])
    return ids


class SpamTask:
    name = "spam"

    def __init__(self, data: Path, tokenizer, split: str, batch_size: int, max_tokens: int, seed: int | None = None,
                 lm_weight: float = 0.0) -> None:
        dedup = deduplicate(read_sms(data))
        self.msgs = dedup.messages
        parts = make_split(self.msgs, split, seed)
        train, val = parts.train, parts.validation
        if not val:  # stratified has no validation part: a seeded stratified tenth of train
            sub = [self.msgs[i] for i in train]
            inner = stratified_split(sub, 0.1, parts.seed + 7)
            train, val = [train[i] for i in inner.train], [train[i] for i in inner.test]
        self.train_idx, self.val_idx = train, val
        self.label_ids = label_token_ids(tokenizer)
        self.batch_size, self.max_tokens = batch_size, max_tokens

        # the prompt's fixed text up to "Message:" is its own tokens (GPT-2's pre-tokenizer splits
        # the ':' from the space that starts the message), so the message starts at `header`
        header = len(encode_text(tokenizer, prompt_for("", []).split("Message:")[0] + "Message:"))
        self.encoded, self.message_start = {}, {}
        for i in train + val:
            full = encode_text(tokenizer, prompt_for(self.msgs[i].text, []))
            self.encoded[i] = full[-(max_tokens - 1):]  # a long message loses its start, as eval spam does
            self.message_start[i] = max(0, header - (len(full) - len(self.encoded[i])))
        self.lm_weight = lm_weight
        self.tokens_per_batch = batch_size * float(np.mean([len(self.encoded[i]) + 1 for i in train]))
        self.split = parts.describe(self.msgs)
        self.split["fine_tune_train"] = len(train)
        self.split["fine_tune_validation"] = len(val)
        self.sizes = {"train_messages": len(train), "validation_messages": len(val),
                      "deduplicated_messages": len(self.msgs), "split": self.split}

    def _lm_positions(self, i: int) -> int:
        return max(0, len(self.encoded[i]) - 1 - max(0, self.message_start[i] - 1))

    def _batch(self, idx: list[int], lm_weight: float = 0.0, whole: list[int] | None = None) -> Batch:
        """Messages `idx`; weighed as a part of the batch `whole` when given (its share of the loss)."""
        import torch

        part = whole is not None and len(whole) != len(idx)
        n_whole = len(whole) if part else len(idx)
        seqs = [self.encoded[i] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), GPT2_EOT_ID, dtype=torch.long)  # right padding: causal, never attended
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
        scored = [r * T + len(s) - 1 for r, s in enumerate(seqs)]
        targets = [self.label_ids[self.msgs[i].label] for i in idx]
        tokens = sum(len(s) + 1 for s in seqs)
        if lm_weight <= 0:
            weights = torch.full((len(seqs),), 1.0 / n_whole) if part else None
            return Batch(ids, torch.tensor(scored), torch.tensor(targets), tokens, weights)
        # next-token positions whose target is a message token: p predicts s[p + 1]
        lm_pos = [(r, p) for r, (i, s) in enumerate(zip(idx, seqs))
                  for p in range(max(0, self.message_start[i] - 1), len(s) - 1)]
        n_lm = sum(self._lm_positions(i) for i in whole) if part else len(lm_pos)
        weights = [(1 - lm_weight) / n_whole] * len(seqs) + [lm_weight / max(1, n_lm)] * len(lm_pos)
        scored += [r * T + p for r, p in lm_pos]
        targets += [seqs[r][p + 1] for r, p in lm_pos]
        return Batch(ids, torch.tensor(scored), torch.tensor(targets), tokens, torch.tensor(weights))

    @property
    def capacity(self) -> int:
        return len(self.train_idx)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """A global batch: n positions in the training part (drawn with replacement)."""
        return rng.integers(0, len(self.train_idx), size=n)

    def micro(self, items: np.ndarray, lo: int, hi: int) -> Batch:
        whole = [self.train_idx[int(i)] for i in items]
        return self._batch(whole[lo:hi], self.lm_weight, whole)

    def tokens(self, items: np.ndarray) -> int:
        return int(sum(len(self.encoded[self.train_idx[int(i)]]) + 1 for i in items))

    def batch(self, rng: np.random.Generator) -> Batch:
        return self.micro(self.draw(rng, self.batch_size), 0, self.batch_size)

    def validate(self, nll: NLL, scored_logits: ScoredLogits) -> dict:
        import torch.nn.functional as F

        losses, scores = [], []
        spam, ham = self.label_ids[1], self.label_ids[0]
        for i in range(0, len(self.val_idx), self.batch_size):
            b = self._batch(self.val_idx[i : i + self.batch_size])
            logits = scored_logits(b)
            losses.append(float(F.cross_entropy(logits, b.targets.to(logits.device), reduction="sum")))
            scores.append((logits[:, spam] - logits[:, ham]).cpu().numpy())
        y = np.array([self.msgs[i].label for i in self.val_idx])
        m = metrics(y, np.concatenate(scores) > 0)
        loss = float(np.sum(losses)) / len(self.val_idx)
        # the checkpoint is picked on the target metric, F1, with the label's loss breaking ties
        # (the loss alone is dominated by a few confidently wrong messages on a small split)
        return {"val_loss": round(loss, 4), "val_f1": round(m["f1"], 4), "val_accuracy": round(m["accuracy"], 4),
                "select": (round(1 - m["f1"], 6), loss)}
