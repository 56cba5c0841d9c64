"""GPTQ (Frantar et al. 2022): error-feedback quantization of one linear weight, column by column,
onto the block formats stock llama.cpp runs.

For W (rows = outputs, cols = inputs; GGUF layout) and the Hessian of the layer's squared error,
H = mean over calibration tokens of x x^T (cols, cols), each input column j in turn is rounded
onto its block's grid and the rounding error, divided by the j-th diagonal of the Cholesky factor
U of H^-1 (upper), is carried into the columns not yet quantized: W[:, j+1:] -= err * U[j, j+1:].
This minimises ||(W - Q) X||^2 greedily, the error the layer's outputs actually see, where
round-to-nearest minimises ||W - Q||^2.

Block formats: a block's grid (its scale, its min; kernels.base.Grid) is fitted when the
quantization reaches the block's first column, on the weights as the earlier columns' errors
left them, so the stored scales match the values rounded onto them ("dynamic groups"). With
act-order (columns by decreasing H_jj, which the paper finds better for outliers) the columns
of one block are not consecutive, so every grid is fitted first on the original weights ("static
groups"). Ternary types keep one scale per tensor (or row) from the original weights, as the
file stores it: every value is exactly {-1, 0, +1} times the block scale.

Updates run in lazy batches of `block` columns (the paper's trick: columns inside a batch update
each other at once, later columns once per batch); the batch is a multiple of the format's block
size so a block's columns are always up to date when its grid is fitted.

Memory: H (float64) and its inverse factor (float32), 113 MB together for GPT-2's ffn_down
(3072 columns), plus a float32 copy of W.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..kernels.base import Grid, QuantType
from ..kernels.ternary import EPS, ternary_scale

METHODS = ("rtn", "gptq")  # convert --method: round to nearest (the default), error feedback
GPTQ_TERNARY_SCALE = "row-fit"  # the ternary scale rule --method gptq starts from unless told otherwise


@dataclass(frozen=True)
class GptqOptions:
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it (the paper's 1 %)
    block: int = 128  # lazy-batch width in columns (rounded up to a multiple of the block size)
    act_order: bool = False  # columns by decreasing Hessian diagonal, grids fitted up front

    def __post_init__(self) -> None:
        if not (np.isfinite(self.damp) and 0 <= self.damp <= 10):
            raise InputError(f"--gptq-damp {self.damp}; expected a fraction of the mean Hessian diagonal in 0 .. 10 "
                             "(0.01 is the usual)")
        if self.block < 1:
            raise InputError(f"--gptq-block {self.block}; expected a positive number of columns")


@dataclass
class GptqResult:
    encoded: np.ndarray  # (rows, row bytes) uint8, the type's blocks
    stats: dict  # what the converter reports (ternary: sparsity, scale)


def inverse_factor(h: np.ndarray, damp: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dead-column mask); a column no
    calibration token reached (H_jj = 0) gets H_jj = 1 and carries no error."""
    h = np.array(h, dtype=np.float64)
    if not np.isfinite(h).all():
        raise InputError(f"tensor {name}: the Hessian of its inputs has non-finite entries; expected finite "
                         "activations (check the calibration text and the model)")
    diag = np.diag(h).copy()
    dead = diag <= 0
    if dead.all():
        raise InputError(f"tensor {name}: every input column is zero over the calibration text; expected "
                         "some activation (more or other calibration text)")
    idx = np.arange(h.shape[0])
    h[dead, :] = 0
    h[:, dead] = 0
    h[idx[dead], idx[dead]] = 1
    lam = damp * float(diag[~dead].mean())
    h[idx, idx] += lam
    import torch

    # float32 from here, as the paper's code (the dampening keeps it well conditioned). With J the
    # order reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper:
    # the factor is one Cholesky and one triangular solve, no explicit inverse of H.
    try:
        low = torch.linalg.cholesky(torch.flip(torch.from_numpy(h).float(), (0, 1)))
        eye = torch.eye(h.shape[0], dtype=torch.float32)
        upper = torch.flip(torch.linalg.solve_triangular(low, eye, upper=False), (0, 1)).numpy()
    except torch.linalg.LinAlgError:
        raise InputError(f"tensor {name}: the Hessian of its inputs is not positive definite after dampening by "
                         f"{lam:.3g} (--gptq-damp {damp} of the mean diagonal); expected a larger --gptq-damp or "
                         "more calibration tokens") from None
    if not np.isfinite(upper).all():
        raise InputError(f"tensor {name}: the inverse Hessian is not finite after dampening by {lam:.3g}; expected "
                         "a larger --gptq-damp")
    return upper, dead


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, qtype: type[QuantType], *, name: str,
                  opts: GptqOptions = GptqOptions(), importance: np.ndarray | None = None,
                  ternary_scale_mode: str = "tensor") -> GptqResult:
    """W (rows, cols) float32 in GGUF layout, H (cols, cols) -> the type's bytes for W.
    `importance` (cols,), an imatrix entry, weighs the fit of each block's grid (and a fitted
    ternary scale), as convert --imatrix does for round-to-nearest."""
    rows, cols = w.shape
    bs = qtype.block_size
    if cols % bs:
        raise InputError(f"tensor {name}: {cols} input columns are not a multiple of {qtype.name}'s block of {bs}")
    perm = np.argsort(-np.diag(hessian), kind="stable") if opts.act_order else np.arange(cols)
    upper, dead = inverse_factor(hessian[np.ix_(perm, perm)] if opts.act_order else hessian, opts.damp, name)
    W = np.array(w, dtype=np.float32)
    W[:, perm[dead]] = 0
    scale = None
    if qtype.is_ternary:
        fit_weight = importance if importance is not None else np.maximum(np.diag(hessian), 0) + 1e-12
        scale = ternary_scale(W, ternary_scale_mode, fit_weight)  # dead columns already zeroed

    def grid_of(g: int, x: np.ndarray) -> Grid:
        imp = None if importance is None else importance[g * bs : (g + 1) * bs]
        return qtype.grid(np.ascontiguousarray(x, dtype=np.float32), imp, scale)

    # static groups under act-order: every grid from the original weights, before any update
    grids = {g: grid_of(g, W[:, g * bs : (g + 1) * bs]) for g in range(cols // bs)} if opts.act_order else {}
    # Column-major from here (Wt[j] is input column j over all rows, contiguous): every column
    # read and every update below touches contiguous memory (2x faster than strided columns).
    Wt = np.ascontiguousarray(W[:, perm].T)
    codes_t = np.zeros((cols, rows), dtype=np.int32)  # in original column order
    batch = max(bs, -(-opts.block // bs) * bs)
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        B = Wt[i1:i2]  # a view: updated in place
        err = np.zeros((i2 - i1, rows), dtype=np.float32)
        U1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = int(perm[i1 + i])
            g, col = divmod(c, bs)
            if g not in grids:  # dynamic groups: the block's columns are consecutive and up to date here
                grids[g] = grid_of(g, B[i : i + bs].T)
            wcol = B[i]
            k, q = grids[g].round_column(wcol, col)
            codes_t[c] = k
            e = (wcol - q) / U1[i, i]
            B[i:] -= np.outer(U1[i, i:], e)
            err[i] = e
        Wt[i2:] -= upper[i1:i2, i2:].T @ err
    codes = codes_t.T
    stats: dict = {"method": "gptq"}
    if qtype.is_ternary:
        t = (codes - 1).astype(np.int8)
        scale = refit_ternary_scale(np.asarray(w, np.float64), t, hessian, scale, ternary_scale_mode)
        stats.update(sparsity=float((t == 0).mean()), scale_mode=ternary_scale_mode, scale=float(scale.mean()))
        return GptqResult(np.ascontiguousarray(qtype.pack(t, scale)), stats)
    encoded = np.concatenate([grids[g].pack(codes[:, g * bs : (g + 1) * bs]) for g in range(cols // bs)], axis=1)
    return GptqResult(np.ascontiguousarray(encoded), stats)


def refit_ternary_scale(w: np.ndarray, t: np.ndarray, hessian: np.ndarray, scale: np.ndarray, mode: str) -> np.ndarray:
    """With the codes t fixed, the scale of least output error ||(w - s t) X||^2: per row
    s = (w H t^T) / (t H t^T), or one s over all rows in "tensor" mode (the file keeps the scale
    mode's granularity); float16 as the block stores it, kept where the fit is undefined.
    Measured on the reference (tq2_0, row-fit, 16k tokens, torch, 6 held-out windows):
    1.52x -> 1.23x the f16 perplexity."""
    tf = t.astype(np.float64)
    ht = tf @ hessian  # (rows, cols): H is symmetric
    num, den = (w * ht).sum(axis=1), (tf * ht).sum(axis=1)
    if mode == "tensor":
        num, den = np.full_like(num, num.sum()), np.full_like(den, den.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = np.where(den > 0, num / den, np.nan)
    ok = np.isfinite(fit) & (fit > 0)
    new = np.where(ok, np.maximum(fit, float(EPS)), scale[:, 0]).astype(np.float16).astype(np.float32)
    return new.reshape(-1, 1)
