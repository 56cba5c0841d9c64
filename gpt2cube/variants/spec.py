"""What a GPT-2 variant is, without torch: its options, their checks, and which llama.cpp graph
(if any) computes it exactly.

A variant is one GPT-2 block structure (fused [Q|K|V] with contiguous heads, LayerNorm with bias,
tanh GELU) with a position scheme from `POSITIONS`, an attention from `ATTENTIONS` and, optionally,
parallel attention + MLP from one LayerNorm, duo-predict training (sequences read left to right
and right to left in alternation, a learned direction embedding saying which) and drift-diffusion
training (the residual stream as an Euler-Maruyama path: each block is the drift of one step,
Gaussian noise the diffusion, in training only). The llama.cpp facts (vendored llama.cpp 0c1e570, src/models/*.cpp):
- gpt2: learned absolute positions (`position_embd`); a fixed sinusoid table is the same graph.
- gptneox: RoPE in NEOX pairing (dimension i with i + n_rot/2) on the first n_rot dimensions of
  each head, `use_parallel_residual` for x + attn(ln1 x) + mlp(ln2 x); no position table;
  `output.weight` required.
- mpt: no position table (optional), ALiBi when `max_alibi_bias` > 0 (ggml's slopes), tied output.
Everything else here is PyTorch-only, and `llama_target` says why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError

SCHEMA_VERSION = 1
ARCHITECTURE = "GPT2CubeVariantLM"  # config.json "architectures" of a variant checkpoint
MODEL_TYPE = "gpt2cube_variant"


@dataclass(frozen=True)
class Position:
    name: str
    summary: str
    llama_arch: str | None  # the llama.cpp graph that computes it exactly, sequential blocks
    why_not: str = ""  # when llama_arch is None: the reason, one clause
    rotary: bool = False  # takes --rope-fraction / --rope-base
    absolute: bool = False  # a table added to the token embeddings (transformer.wpe.weight)
    distance_bias: bool = False  # an attention bias of query-key distance


POSITIONS: dict[str, Position] = {}


def _register(p: Position) -> None:
    POSITIONS[p.name] = p


_register(Position("learned", "learned absolute position embeddings (GPT-2)", "gpt2", absolute=True))
_register(Position("sinusoidal", "fixed sinusoid table added to the embeddings, amplitude the embeddings' init std "
                   "(Vaswani et al.'s ratio)", "gpt2",
                   absolute=True))
_register(Position("rope", "rotary embeddings on the first --rope-fraction of each head, NEOX pairing", "gptneox",
                   rotary=True))
_register(Position("alibi", "linear distance bias per head, ggml's slopes for max bias 8 (Press et al.)", "mpt",
                   distance_bias=True))
_register(Position("none", "no positional signal beyond the causal mask", "mpt"))
_register(Position("kerple", "learned logarithmic distance bias per head, -r1 log(1 + r2 |i - j|) (KERPLE)", None,
                   "KERPLE's learned log-distance bias has no ggml graph (ALiBi's bias is linear in distance)",
                   distance_bias=True))
_register(Position("fire", "learned MLP of progressively normalised log distance, per head (FIRE)", None,
                   "FIRE's learned position MLP has no ggml graph", distance_bias=True))
_register(Position("rotating", "RoPE whose frequencies differ per head (head h scaled by 2^(-8h/H))", None,
                   "llama.cpp's rope applies one frequency set to every head", rotary=True))

@dataclass(frozen=True)
class Attention:
    name: str
    summary: str
    why_not: str = ""  # when llama.cpp cannot run it: the reason, one clause


ATTENTIONS: dict[str, Attention] = {}
for _a in (Attention("full", "softmax attention over every earlier token (GPT-2)"),
           Attention("linformer", "causal Linformer: each earlier block of --linformer-block keys and values is "
                     "projected to --linformer-k learned mixtures; the query's own block is attended exactly",
                     "Linformer's learned sequence projections of keys and values have no ggml graph")):
    ATTENTIONS[_a.name] = _a


@dataclass(frozen=True)
class VariantSpec:
    pos: str = "learned"
    rope_fraction: float = 1.0
    rope_base: float = 10000.0
    parallel: bool = False
    alibi_max_bias: float = 8.0
    attention: str = "full"
    linformer_block: int = 32
    linformer_k: int = 8
    duo_predict: bool = False
    diffusion_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.pos not in POSITIONS:
            raise InputError(f"position scheme {self.pos!r} is not known to this version; "
                             f"known: {', '.join(POSITIONS)}")
        rotary = POSITIONS[self.pos].rotary
        if not rotary and not self._defaults("rope_fraction", "rope_base"):
            raise InputError(f"--rope-fraction / --rope-base apply to rotary positions (rope, rotating), not --pos {self.pos}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise InputError(f"--rope-fraction {self.rope_fraction}: expected a fraction in (0, 1]")
        if self.rope_base <= 1.0:
            raise InputError(f"--rope-base {self.rope_base}: expected a value above 1")
        if self.alibi_max_bias <= 0:
            raise InputError(f"alibi_max_bias {self.alibi_max_bias}: expected a positive value")
        if self.attention not in ATTENTIONS:
            raise InputError(f"attention {self.attention!r} is not known to this version; known: {', '.join(ATTENTIONS)}")
        if self.attention != "linformer" and not self._defaults("linformer_block", "linformer_k"):
            raise InputError(f"--linformer-block / --linformer-k apply to --attention linformer, not {self.attention}")
        if self.attention == "linformer":
            for name, v in (("--linformer-block", self.linformer_block), ("--linformer-k", self.linformer_k)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise InputError(f"{name} {v!r}: expected a positive integer")
            if not self.linformer_k < self.linformer_block:
                raise InputError(f"--linformer-k {self.linformer_k} must be below --linformer-block "
                                 f"{self.linformer_block} (k mixtures summarise each block of that many keys)")
            if POSITIONS[self.pos].distance_bias:
                raise InputError(f"--attention linformer with --pos {self.pos}: a compressed key mixes positions, "
                                 f"so a bias of query-key distance has no meaning for it; use --pos "
                                 + "|".join(p.name for p in POSITIONS.values() if not p.distance_bias))
        if not isinstance(self.diffusion_sigma, (int, float)) or isinstance(self.diffusion_sigma, bool) \
                or not 0.0 <= self.diffusion_sigma <= 10.0:
            raise InputError(f"--drift-diffusion {self.diffusion_sigma!r}: expected a noise scale in [0, 10]")

    def _defaults(self, *names: str) -> bool:
        """Whether these options keep their default values (options that belong to another choice)."""
        return all(getattr(self, n) == self.__dataclass_fields__[n].default for n in names)

    @property
    def is_plain_gpt2(self) -> bool:
        """Exactly transformers' GPT-2 (trained and saved as GPT2LMHeadModel)."""
        return (self.pos == "learned" and not self.parallel and self.attention == "full" and not self.duo_predict
                and self.diffusion_sigma == 0.0)

    def rotary_dims(self, head_dim: int) -> int:
        """Dimensions of each head that rotate: the fraction of head_dim, rounded down to even."""
        n = int(head_dim * self.rope_fraction) // 2 * 2
        if n < 2:
            raise InputError(f"--rope-fraction {self.rope_fraction} of head size {head_dim} rotates {n} dimensions; "
                             "at least 2 are needed")
        return n

    def describe(self) -> str:
        parts = [f"pos={self.pos}"]
        if POSITIONS[self.pos].rotary:
            parts.append(f"rope_fraction={self.rope_fraction:g}")
        if self.parallel:
            parts.append("parallel")
        if self.attention != "full":
            parts.append(f"attention={self.attention}(block {self.linformer_block}, k {self.linformer_k})")
        if self.duo_predict:
            parts.append("duo-predict")
        if self.diffusion_sigma:
            parts.append(f"drift-diffusion sigma={self.diffusion_sigma:g}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data, where: str) -> "VariantSpec":
        if not isinstance(data, dict):
            raise InputError(f"{where}: 'variant' = {data!r}; expected an object")
        schema = data.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise InputError(f"{where}: variant schema {schema!r} is not one this version reads ({SCHEMA_VERSION})")
        fields = {k: v for k, v in data.items() if k != "schema"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"{where}: variant option(s) {', '.join(unknown)} are not known to this version")
        try:
            return cls(**fields)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        except TypeError as e:
            raise InputError(f"{where}: variant {data!r} is malformed ({e})") from None


def llama_target(spec: VariantSpec) -> tuple[str | None, str]:
    """(llama.cpp architecture, "") when a graph computes the variant exactly, else (None, why)."""
    p = POSITIONS[spec.pos]
    if p.llama_arch is None:
        return None, p.why_not
    if spec.attention != "full":
        return None, ATTENTIONS[spec.attention].why_not
    if spec.duo_predict:
        return None, ("duo-predict's direction embedding (its left-to-right row added to every input) is in no "
                      "llama.cpp graph")
    # drift-diffusion: the noise is training-only, so the file is the drift path, GPT-2's own graph
    if spec.parallel:
        if p.llama_arch == "gptneox":
            return "gptneox", ""
        return None, (f"parallel blocks run in llama.cpp only with RoPE (the gptneox / phi2 graphs); "
                      f"no graph holds parallel blocks with --pos {spec.pos}")
    return p.llama_arch, ""


def alibi_slopes(n_head: int, max_bias: float) -> list[float]:
    """ggml's ALiBi slopes (ggml_soft_max_ext with max_bias): for a head count that is not a power
    of two, the first 2^floor(log2 H) heads take the geometric series of that power and the rest
    interleave the series of the next one (Press et al.'s recipe, as MPT computes it)."""
    n_log2 = 1 << (n_head.bit_length() - 1)
    m0 = 2.0 ** (-max_bias / n_log2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_log2)
    return [m0 ** (h + 1) if h < n_log2 else m1 ** (2 * (h - n_log2) + 1) for h in range(n_head)]


OWN_ARCHITECTURES = (ARCHITECTURE, "GPT2CubeNeuralLM")  # variant family; neural baselines (neural.py)
NEURAL_KINDS = ("ffnn", "rnn", "lstm")  # neural.py's bodies, in this order


def own_architecture(path: Path) -> str | None:
    """The gpt2cube torch model a checkpoint directory holds (one of OWN_ARCHITECTURES), or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    declared = data.get("architectures") if isinstance(data, dict) else None
    return next((a for a in OWN_ARCHITECTURES if isinstance(declared, list) and a in declared), None)


def is_variant_dir(path: Path) -> bool:
    return own_architecture(path) == ARCHITECTURE
