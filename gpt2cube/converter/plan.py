"""Which encoding each tensor gets.

Norms and biases stay f32 (ggml's norm and add kernels read them as f32); every weight matrix
takes the requested type when its row length (ne0) fits the type's block, otherwise a stated
fallback with a warning that names the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import QuantType, get_quant_type
from .arch import TensorSpec

# When a row does not fit the requested type's block: the next type that always fits.
FALLBACK = "f16"


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    qtype: type[QuantType]

    @property
    def nbytes(self) -> int:
        return self.qtype.nbytes(self.spec.shape)


def plan_types(specs: list[TensorSpec], out_type: str) -> tuple[list[PlannedTensor], list[str]]:
    wanted = get_quant_type(out_type)
    f32, fallback = get_quant_type("f32"), get_quant_type(FALLBACK)
    planned: list[PlannedTensor] = []
    fell_back: list[str] = []
    for s in specs:
        if len(s.shape) < 2 or s.role in ("norm", "bias"):
            qtype = f32
        elif wanted.row_ok(s.shape[-1]):
            qtype = wanted
        else:
            qtype = fallback
            fell_back.append(f"{s.gguf_name} (row {s.shape[-1]})")
        planned.append(PlannedTensor(s, qtype))
    warnings = []
    if fell_back:
        warnings.append(
            f"{len(fell_back)} tensor(s) have rows that are not a multiple of {wanted.block_size} "
            f"and cannot be {out_type}; writing them as {FALLBACK}: {', '.join(fell_back)}"
        )
    return planned, warnings
