"""Causal Linformer attention (Wang et al. 2020, made causal by blocks).

Linformer projects the n keys and values of a sequence along the sequence axis to k learned
mixtures (K' = E K, V' = F V), so attention costs O(n k) instead of O(n^2). Projecting the whole
sequence would let a query see keys after it, so here the sequence is cut into blocks of B
positions: every complete earlier block is projected to k mixtures with one learned E, F in
R^{k x B} per layer (shared by the heads, as Linformer's "layerwise sharing"), and a query
attends to the mixtures of every earlier block plus, exactly and causally, the keys of its own
block. Cost per query: B + k * (t / B) keys instead of t. E and F start as average pooling over
k contiguous stretches of the block.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalLinformer(nn.Module):
    def __init__(self, block: int, k: int) -> None:
        super().__init__()
        self.block, self.k = block, k
        edges = torch.linspace(0, block, k + 1).round().long()
        pool = torch.zeros(k, block)
        for r in range(k):
            pool[r, edges[r]: edges[r + 1]] = 1.0 / float(edges[r + 1] - edges[r])
        self.e = nn.Parameter(pool.clone())
        self.f = nn.Parameter(pool.clone())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, H, T, hd] (positions already applied); returns [B, H, T, hd]."""
        Bn, H, T, d = q.shape
        b, r = self.block, self.k
        pos = torch.arange(T, device=q.device)
        blk = pos // b
        allowed = (blk[:, None] == blk[None, :]) & (pos[None, :] <= pos[:, None])  # own block, causal
        n = T // b  # complete blocks; only those before a query's own block are ever read
        if n:
            def mix(w, x):
                return torch.einsum("rt,bhntd->bhnrd", w.to(x.dtype), x[:, :, : n * b].reshape(Bn, H, n, b, d)) \
                    .reshape(Bn, H, n * r, d)

            slot_blk = torch.arange(n * r, device=q.device) // r
            k = torch.cat([k, mix(self.e, k)], dim=2)
            v = torch.cat([v, mix(self.f, v)], dim=2)
            allowed = torch.cat([allowed, slot_blk[None, :] < blk[:, None]], dim=1)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None])
