"""How much each FFN neuron matters, measured on calibration text.

For layer l, neuron j has activation a_j = GELU(x W_up + b_up)_j (the input of c_proj) and
writes a_j * W_down[j, :] into the residual stream. Removing it replaces a_j by a constant c_j:
its calibration mean when the mean contribution is folded into the next bias (FLAP's bias
compensation), 0 otherwise. The measures (each a registered function, higher = keep):
 - activation: E_t[(a_tj - c_j)^2] * ||W_down[j]||^2, the expected squared change of the
   layer's output when the neuron is removed (FLAP's fluctuation metric with compensation,
   the activation-energy metric of Minitron/Wanda-style pruning without);
 - taylor: |sum_t (a_tj - c_j) * dL/da_tj|, the first-order change of the calibration loss
   (LLM-Pruner's group Taylor importance);
 - magnitude: ||W_up[:, j]|| * ||W_down[j]||, weights only (the baseline every table shows);
 - random: seeded uniform scores (the other baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Calibration:
    """Per layer: the activations' mean (n_ff,), mean square (n_ff,) and, when gradients were
    taken, sum_t a * g (n_ff,) and sum_t g (n_ff,) (for the centred Taylor term)."""
    mean: list[np.ndarray]
    mean_sq: list[np.ndarray]
    sum_ag: list[np.ndarray] | None
    sum_g: list[np.ndarray] | None
    tokens: int


def calibrate(model, windows: np.ndarray, gradients: bool, batch_size: int = 4) -> Calibration:
    """Run the model over token windows (n, ctx + 1) and gather each layer's FFN activation
    statistics (and, with `gradients`, the LM loss's gradient with respect to them)."""
    import torch
    import torch.nn.functional as F

    blocks = model.transformer.h
    n_ff = blocks[0].mlp.c_fc.nf
    L = len(blocks)
    s1 = [torch.zeros(n_ff, dtype=torch.float64) for _ in range(L)]
    s2 = [torch.zeros(n_ff, dtype=torch.float64) for _ in range(L)]
    sag = [torch.zeros(n_ff, dtype=torch.float64) for _ in range(L)]
    sg = [torch.zeros(n_ff, dtype=torch.float64) for _ in range(L)]
    acts: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(_module, inputs):
            a = inputs[0]
            if gradients:
                a.retain_grad()
            acts[i] = a
        return fn

    handles = [b.mlp.c_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    tokens = 0
    model.eval()
    try:
        for k in range(0, len(windows), batch_size):
            xy = torch.from_numpy(windows[k : k + batch_size].astype(np.int64))
            with torch.set_grad_enabled(gradients):
                logits = model(xy[:, :-1]).logits
                if gradients:
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1), reduction="sum")
                    model.zero_grad(set_to_none=True)
                    loss.backward()
            for i in range(L):
                a = acts[i].detach().reshape(-1, n_ff).double()
                s1[i] += a.sum(0)
                s2[i] += (a * a).sum(0)
                if gradients:
                    g = acts[i].grad.reshape(-1, n_ff).double()
                    sag[i] += (a * g).sum(0)
                    sg[i] += g.sum(0)
            tokens += xy[:, :-1].numel()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return Calibration([(s / tokens).numpy() for s in s1], [(s / tokens).numpy() for s in s2],
                       [s.numpy() for s in sag] if gradients else None, [s.numpy() for s in sg] if gradients else None,
                       tokens)


# name -> (needs gradients, score(layer weights, calibration, layer index, compensate, rng))
Score = Callable[[dict, Calibration, int, bool, np.random.Generator], np.ndarray]
MEASURES: dict[str, tuple[bool, Score]] = {}
WEIGHT_ONLY = {"magnitude", "random"}  # measures that read no calibration statistics


def measure(name: str, gradients: bool = False):
    def deco(fn: Score) -> Score:
        MEASURES[name] = (gradients, fn)
        return fn
    return deco


def _removal_constant(cal: Calibration, i: int, compensate: bool) -> np.ndarray:
    return cal.mean[i] if compensate else np.zeros_like(cal.mean[i])


@measure("activation")
def _activation(w: dict, cal: Calibration, i: int, compensate: bool, rng) -> np.ndarray:
    c = _removal_constant(cal, i, compensate)
    # E[(a - c)^2] = E[a^2] - 2 c E[a] + c^2
    energy = np.maximum(cal.mean_sq[i] - 2 * c * cal.mean[i] + c * c, 0)
    return energy * (w["down"].astype(np.float64) ** 2).sum(axis=1)


@measure("taylor", gradients=True)
def _taylor(w: dict, cal: Calibration, i: int, compensate: bool, rng) -> np.ndarray:
    c = _removal_constant(cal, i, compensate)
    return np.abs(cal.sum_ag[i] - c * cal.sum_g[i])  # sum_t (a - c) g


@measure("magnitude")
def _magnitude(w: dict, cal: Calibration, i: int, compensate: bool, rng) -> np.ndarray:
    up, down = w["up"].astype(np.float64), w["down"].astype(np.float64)
    return np.linalg.norm(up, axis=0) * np.linalg.norm(down, axis=1)


@measure("random")
def _random(w: dict, cal: Calibration, i: int, compensate: bool, rng) -> np.ndarray:
    return rng.random(w["down"].shape[0])
