"""A torch reference of the routed FFN, for checking the C++ engine: the same routing (router
bits, ball of radius r, contiguous groups) computed with plain tensor ops on a transformers
GPT-2 whose FFNs are already in vertex order (e.g. `model_from_gguf` of a hypercube file), plus
the file's compensation row for (radius, vertex) when it has one."""

from __future__ import annotations

import numpy as np

from .metadata import HypercubeInfo
from .topology import Hypercube


def routed_forward(model, info: HypercubeInfo, tokens, radius: int,
                   vertices_in: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, vocab), vertices (n_layer, n)) with every FFN routed at `radius`. With
    `vertices_in` (n_layer, n) each token takes that vertex instead of its router's: a token whose
    margin is within rounding of 0 may go either way, and this compares the FFN arithmetic alone."""
    import torch

    cube = Hypercube(info.dim)
    balls = torch.from_numpy(cube.ball_table(min(radius, info.dim)).astype(np.int64))  # (V, B)
    g = info.group_size
    vertices: list[np.ndarray] = []
    originals = []

    r = min(radius, info.dim)
    comp = (torch.from_numpy(info.compensation[:, r]) if info.compensation is not None and r < info.dim
            else torch.zeros(len(info.router_weight), cube.n_vertices, info.router_weight.shape[2]))  # (L, V, E)

    def routed_mlp(mlp, layer: int):
        w = torch.from_numpy(info.router_weight[layer])
        b = torch.from_numpy(info.router_bias[layer])

        def forward(x):  # x (1, n, E)
            m = x @ w.T + b                                                        # (1, n, d)
            v = ((m > 0).long() << torch.arange(info.dim)).sum(-1)[0]              # (n,)
            if vertices_in is not None:
                v = torch.from_numpy(np.asarray(vertices_in[layer], dtype=np.int64))
            vertices.append(v.numpy())
            neurons = (balls[v][:, :, None] * g + torch.arange(g)).reshape(len(v), -1)  # (n, B g)
            up_w = mlp.c_fc.weight.T[neurons]                                      # (n, B g, E)
            h = mlp.act(torch.einsum("nje,ne->nj", up_w, x[0]) + mlp.c_fc.bias[neurons])
            down_w = mlp.c_proj.weight[neurons]                                    # (n, B g, E)
            # + the skipped groups' mean output at this vertex (schema 2's compensation; 0 when dense)
            return (torch.einsum("nje,nj->ne", down_w, h) + mlp.c_proj.bias + comp[layer][v])[None]
        return forward

    try:
        for i, blk in enumerate(model.transformer.h):
            originals.append(blk.mlp.forward)
            blk.mlp.forward = routed_mlp(blk.mlp, i)
        with torch.no_grad():
            logits = model(torch.tensor([list(tokens)])).logits[0].float().numpy()
    finally:
        for blk, fwd in zip(model.transformer.h, originals):
            blk.mlp.forward = fwd
    return logits, np.stack(vertices)
