"""HellaSwag in llama.cpp's text format: 6 lines per task (context, gold ending index 0-3, four
endings). Each candidate is context + " " + ending; as llama.cpp's `--hellaswag` does, the score
of an ending is the mean log-probability of its tokens after the prefix the four candidates
share (length-normalised), and the task is right when the gold ending scores highest.
Accuracy is reported with its standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..gguf_file import model_context
from .llama_runner import load_llama
from .perplexity import token_logprobs


@dataclass
class Task:
    context: str
    gold: int
    endings: list[str]


def read_hellaswag(path: Path) -> list[Task]:
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected HellaSwag in llama.cpp's 6-lines-per-task format")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise InputError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold index, 4 endings per task)")
    tasks = []
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise InputError(f"{path}:{i + 2}: gold ending index {gold!r}; expected 0, 1, 2 or 3")
        tasks.append(Task(lines[i], int(gold), lines[i + 2 : i + 6]))
    if not tasks:
        raise InputError(f"{path}: no tasks")
    return tasks


def subset(tasks: list[Task], limit: int | None, seed: int) -> list[Task]:
    """A seeded random subset of `limit` tasks in file order (all of them without a limit): the
    first N of the file would be a biased sample (the file is grouped by source activity)."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}; expected a positive number of tasks")
    if not limit or limit >= len(tasks):
        return tasks
    keep = np.sort(np.random.default_rng(seed).choice(len(tasks), size=limit, replace=False))
    return [tasks[i] for i in keep]


def ending_scores(seq_logprobs: list[np.ndarray], prefix: int) -> np.ndarray:
    """Mean log-probability of each candidate's tokens from position `prefix` on.

    seq_logprobs[s][j] = log P(token j | tokens < j) for candidate s (entry 0 unused)."""
    return np.array([lp[prefix:].mean() for lp in seq_logprobs])


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    k = 0
    while k < n - 1 and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return max(k, 1)


def _accuracy(tasks: list[Task], tokenize, seq_logits, n_ctx: int, progress: bool) -> int:
    """Tasks answered right; `tokenize(text)` gives token ids, `seq_logits(ids)` logits (len, V)."""
    from tqdm import tqdm

    correct = 0
    for task in tqdm(tasks, desc="hellaswag", unit="task", disable=not progress):
        seqs = [tokenize(f"{task.context} {e}")[-n_ctx:] for e in task.endings]
        prefix = _common_prefix(seqs)
        lps = []
        for s in seqs:
            lp = np.zeros(len(s))
            lp[1:] = token_logprobs(seq_logits(s)[: len(s) - 1], np.asarray(s[1:]))
            lps.append(lp)
        correct += int(np.argmax(ending_scores(lps, prefix)) == task.gold)
    return correct


def evaluate_hellaswag(model: Path, data: Path, *, limit: int | None = None, seed: int = 0,
                       n_threads: int | None = None, progress: bool = False) -> dict:
    """MODEL: a GGUF file (llama.cpp) or a checkpoint directory (PyTorch: transformers' GPT-2, a
    gpt2cube variant or neural baseline)."""
    all_tasks = read_hellaswag(data)
    tasks = subset(all_tasks, limit, seed)
    t0 = time.perf_counter()
    if Path(model).is_dir():
        correct, engine = _torch_accuracy(Path(model), tasks, progress), "pytorch"
    else:
        n_ctx = min(512, model_context(model))
        llm = load_llama(model, n_ctx=n_ctx, logits_all=True, n_threads=n_threads)

        def seq_logits(ids: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)])

        try:
            correct = _accuracy(tasks, lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False), seq_logits, n_ctx,
                                progress)
        finally:
            llm.close()
        engine = "llama.cpp"
    acc = correct / len(tasks)
    return {"model": str(model), "data": str(data), "split": "validation", "tasks_in_file": len(all_tasks),
            "tasks": len(tasks), "seed": seed, "engine": engine, "accuracy": acc,
            "stderr": math.sqrt(acc * (1 - acc) / len(tasks)), "seconds": time.perf_counter() - t0}


def _torch_accuracy(model_dir: Path, tasks: list[Task], progress: bool) -> int:
    import torch

    from ..models import load_hf_model
    from ..tokenizers import checkpoint_tokenizer, encode_text

    model = load_hf_model(model_dir)
    tok = checkpoint_tokenizer(model_dir)
    n_ctx = min(512, model.config.n_positions)

    def seq_logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    return _accuracy(tasks, lambda t: encode_text(tok, t), seq_logits, n_ctx, progress)
