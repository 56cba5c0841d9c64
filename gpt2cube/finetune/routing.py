"""Routing-aware fine-tuning: the hypercube routing of a GGUF file applied in the training forward.

`RoutingMask(model, path, radius)` reads a hypercube file's routers and neuron permutation
(`convert --hypercube-dim`), checks them against the checkpoint's shape, and hooks every FFN:
the token's vertex is computed from the FFN input exactly as the engine does (bit k set where
w_k . x + b_k > 0, in float32), and the activations of neurons outside the groups of the ball of
`radius` around it are multiplied by 0, and the file's compensation row for (radius, vertex) is
added to the FFN output -- what the routed engine computes, in the checkpoint's own neuron order
(perm maps file positions to checkpoint neurons). The routers and the permutation
stay fixed, so `convert --hypercube-from FILE` writes the fine-tuned weights with the very routing
they were trained under. The mask is not differentiable in the router; the weights learn to live
with it (the teacher of `--distill` stays dense).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..hypercube.calibrate import default_radius
from ..hypercube.metadata import HypercubeInfo, read_routing_file
from ..hypercube.router import group_of
from ..hypercube.topology import Hypercube


def load_routing(path: Path, model) -> HypercubeInfo:
    """The hypercube metadata of `path`, checked against a transformers GPT-2's shape."""
    c = model.config
    return read_routing_file(Path(path), c.n_layer, c.n_embd, c.n_inner or 4 * c.n_embd, "--routed")


class RoutingMask:
    def __init__(self, model, path: Path, radius: int | None = None, compensate: bool = True) -> None:
        import torch

        self.info = load_routing(path, model)
        d = self.info.dim
        if radius is None:  # the radius the router was fitted for, else calibrate's default
            radius = self.info.router_radius if self.info.router_radius is not None else default_radius(d)
        if not 0 <= radius < d:
            raise InputError(f"--radius {radius}; expected 0..{d - 1} for {path}'s Q_{d} (radius {d} is the dense FFN)")
        self.radius = radius
        cube = Hypercube(d)
        ball = torch.from_numpy((cube.distances() <= radius).astype(np.float32))        # (V, V)
        # mask[v, j] over the checkpoint's neurons j: 1 where j's group is in the ball of v
        self._masks = [ball[:, torch.from_numpy(group_of(p, cube.n_vertices))] for p in self.info.permutation]  # L x (V, F)
        self._w = [torch.from_numpy(w) for w in self.info.router_weight]
        self._b = [torch.from_numpy(b) for b in self.info.router_bias]
        self._pow = 2 ** torch.arange(d)
        comp = self.info.compensation
        self._comp = [torch.from_numpy(c[radius]) for c in comp] if comp is not None and compensate else None  # L x (V, E)
        self._vertex: dict[int, object] = {}
        self.hooks = []
        for i, blk in enumerate(model.transformer.h):
            self.hooks.append(blk.mlp.register_forward_pre_hook(self._route(i)))
            self.hooks.append(blk.mlp.act.register_forward_hook(self._mask(i)))
            if self._comp is not None:
                self.hooks.append(blk.mlp.register_forward_hook(self._compensate(i)))

    def _route(self, i: int):
        import torch

        def fn(_module, args):
            with torch.no_grad(), torch.autocast(args[0].device.type, enabled=False):
                x = args[0].float()
                m = x @ self._w[i].to(x.device).T + self._b[i].to(x.device)
                self._vertex[i] = ((m > 0).long() * self._pow.to(x.device)).sum(-1)  # (..., n)
        return fn

    def _mask(self, i: int):
        def fn(_module, _args, out):
            v = self._vertex[i] if self._comp is not None else self._vertex.pop(i)
            return out * self._masks[i].to(out.device)[v].to(out.dtype)  # (..., n, F)
        return fn

    def _compensate(self, i: int):
        def fn(_module, _args, out):  # + the skipped groups' mean output at the token's vertex
            return out + self._comp[i].to(out.device)[self._vertex.pop(i)].to(out.dtype)
        return fn

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
