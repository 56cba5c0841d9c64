"""Duo-predict's sequences (the seed's duo-predict GPT-2, shiva-upsurge/parallel_transformer d868f70).

T real tokens x_0..x_{T-1} are read as the 2T-1 tokens [x_0, M, x_1, M, ..., M, x_{T-1}]: index 2k is
x_k, index 2k+1 is the mask token M_k, which shares x_k's position k. Attention (`duo_mask`): x_k
sees x_0..x_k (never a mask, so the real tokens alone are the causal LM: the path that converts);
M_k sees x_0..x_{k-1}, itself and x_{k+1}: the token it stands for, x_k, is the one it cannot see.

Loss (`duo_training_pair`), one cross-entropy over every scored position of both kinds:
- "intended": x_k learns x_{k+1} (next token), M_k learns x_k (the token between its neighbours);
- "original": the alignment the seed's committed loss trains: it builds labels already shifted
  (x_k -> x_{k+1}, M_k -> x_k) and hands them to a loss that shifts them once more, so x_k learns
  x_k (itself, which it can see) and M_k learns x_{k+2}.
"""

from __future__ import annotations

import torch

IGNORE = -100  # cross-entropy's ignore_index


def duo_positions(n_real: int, device=None) -> torch.Tensor:
    """[2T-1]: the position of each interleaved token (x_k and M_k both at k)."""
    return torch.arange(2 * n_real - 1, device=device) // 2


def duo_mask(n_real: int, device=None) -> torch.Tensor:
    """[2T-1, 2T-1] bool, True where the query (row) may attend to the key (column)."""
    n = 2 * n_real - 1
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    real_key = k % 2 == 0
    real_row = real_key & (k <= q)  # x_k: x_0..x_k
    mask_row = (real_key & (k <= q - 3)) | (k == q) | (k == q + 1)  # M_k (q = 2k+1): x_0..x_{k-1}, M_k, x_{k+1}
    return torch.where(q % 2 == 0, real_row, mask_row)


def duo_training_pair(xy: torch.Tensor, mask_id: int, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainer windows [B, T+1] -> (inputs [B, 2T-1], targets [B, 2T-1]) for `loss` (module doc).
    The window's extra token is x_{T-1}'s next token (intended) and M_{T-2}'s x_T (original)."""
    B, T = xy.shape[0], xy.shape[1] - 1
    if T < 2:
        raise ValueError(f"duo-predict needs windows of at least 2 tokens, got {T}")
    inputs = torch.full((B, 2 * T - 1), mask_id, dtype=xy.dtype, device=xy.device)
    inputs[:, 0::2] = xy[:, :T]
    targets = torch.full_like(inputs, IGNORE)
    if loss == "intended":
        targets[:, 0::2] = xy[:, 1 : T + 1]
        targets[:, 1::2] = xy[:, : T - 1]
    elif loss == "original":
        targets[:, 0::2] = xy[:, :T]
        targets[:, 1::2] = xy[:, 2 : T + 1]
    else:
        raise ValueError(f"duo loss {loss!r}")
    return inputs, targets
