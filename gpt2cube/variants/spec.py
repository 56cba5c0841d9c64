"""What a GPT-2 variant is, without torch: its options, their checks, and which llama.cpp graph
(if any) computes it exactly.

A variant is one GPT-2 block structure (fused [Q|K|V] with contiguous heads, LayerNorm with bias,
tanh GELU) with a position scheme from `POSITIONS`, an attention from `ATTENTIONS` and any of:
- parallel residual blocks: attention + MLP from one LayerNorm (GPT-J / PaLM; `parallel_residual`);
- parallel paths (the seed's "parallel GPT-2", shiva-upsurge/parallel_transformer d868f70): stage
  k runs blocks 2k and 2k+1 on the same input and merges them (mean, add, or concat through one
  shared Linear 2E -> E; `parallel_paths`);
- alternate-direction training: sequences read left to right and right to left in alternation, a
  learned direction embedding saying which (`alternate_direction`);
- duo-predict (the seed's): a <|MASK|> token interleaved after every real token, M_k sharing x_k's
  position and seeing x_0..x_{k-1}, itself and x_{k+1}; real tokens see only earlier real tokens;
  real tokens learn the next token, masks the token they stand for (`duo_predict`, `duo_loss`);
- residual diffusion: the residual stream as an Euler-Maruyama path, Gaussian noise after each
  block in training only (`residual_diffusion`);
- drift-diffusion (the seed's): learned per-head H x D drift d, baseline beta and diffusion s on each
  head's attention output before c_proj, a' = a + sigmoid(d) (a - beta), a'' = a' + s eps in
  training only (`drift_diffusion`, a subset of drift, diffusion, baseline).
The llama.cpp facts (vendored llama.cpp 0c1e570, src/models/*.cpp):
- gpt2: learned absolute positions (`position_embd`); a fixed sinusoid table is the same graph.
- gptneox: RoPE in NEOX pairing (dimension i with i + n_rot/2) on the first n_rot dimensions of
  each head, `use_parallel_residual` for x + attn(ln1 x) + mlp(ln2 x); no position table;
  `output.weight` required.
- mpt: no position table (optional), ALiBi when `max_alibi_bias` > 0 (ggml's slopes), tied output.
Everything else here is PyTorch-only, and `llama_target` says why.

Schema 2 (this version) gave the seed's names to the seed's definitions; schema 1 files load with
their options renamed (`_SCHEMA1_RENAMES`): parallel -> parallel_residual, duo_predict ->
alternate_direction, diffusion_sigma -> residual_diffusion, pos rotating -> rope-spread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..constants import GPT2_VOCAB_SIZE
from ..errors import InputError

SCHEMA_VERSION = 2
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
    table: str = ""  # the absolute table's kind: "learned" (an nn.Embedding) or "fixed" (a stored sinusoid)


POSITIONS: dict[str, Position] = {}


def _register(p: Position) -> None:
    POSITIONS[p.name] = p


_register(Position("learned", "learned absolute position embeddings (GPT-2)", "gpt2", absolute=True, table="learned"))
_register(Position("sinusoidal", "fixed sinusoid table added to the embeddings, amplitude the embeddings' init std "
                   "(Vaswani et al.'s ratio)", "gpt2",
                   absolute=True, table="fixed"))
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
_register(Position("rope-spread", "RoPE whose wavelengths spread over the heads (head h's frequencies scaled by "
                   "2^(-8h/H))", None, "llama.cpp's rope applies one frequency set to every head", rotary=True))
_register(Position("rotating", "rotating heads (the seed's): learned position table plus per-head RoPE on Q and K "
                   "over interleaved pairs, frequencies per --rotating-freqs (lr: learned H x D/2 per layer, "
                   "N(0,1) init; gp: 10^(-h/(H-1)) 10000^(-2i/D)), --rotating-norm a LayerNorm over each "
                   "head's frequencies", None,
                   "per-head (learned) rotary frequencies over interleaved pairs have no ggml graph",
                   absolute=True, table="learned"))

ROTATING_FREQS = ("lr", "gp")
PARALLEL_PATHS = ("mean", "concat", "add")  # the seed's bottleneck methods
DD_PARTS = ("drift", "diffusion", "baseline")  # the seed's apply_drift, apply_diffusion, baseline_each_head
DUO_LOSSES = ("intended", "original")
DUO_MASK_TOKEN = "<|MASK|>"  # duo-predict's extra token, the last id of the vocabulary


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


def _parts(value: str) -> tuple[str, ...]:
    return tuple(x for x in (v.strip() for v in value.split(",")) if x) if value else ()


@dataclass(frozen=True)
class VariantSpec:
    pos: str = "learned"
    rope_fraction: float = 1.0
    rope_base: float = 10000.0
    parallel_residual: bool = False
    parallel_paths: str = ""  # "" or one of PARALLEL_PATHS
    alibi_max_bias: float = 8.0
    attention: str = "full"
    linformer_block: int = 32
    linformer_k: int = 8
    alternate_direction: bool = False
    duo_predict: bool = False
    duo_loss: str = "intended"
    residual_diffusion: float = 0.0
    drift_diffusion: str = ""  # "" or a comma list of DD_PARTS, in that order
    rotating_freqs: str = "lr"
    rotating_norm: bool = False

    def __post_init__(self) -> None:
        if self.pos not in POSITIONS:
            raise InputError(f"position scheme {self.pos!r} is not known to this version; "
                             f"known: {', '.join(POSITIONS)}")
        rotary = POSITIONS[self.pos].rotary
        if not rotary and not self._defaults("rope_fraction", "rope_base"):
            raise InputError(f"--rope-fraction / --rope-base apply to rotary positions "
                             f"({', '.join(p.name for p in POSITIONS.values() if p.rotary)}), not --pos {self.pos}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise InputError(f"--rope-fraction {self.rope_fraction}: expected a fraction in (0, 1]")
        if self.rope_base <= 1.0:
            raise InputError(f"--rope-base {self.rope_base}: expected a value above 1")
        if self.pos != "rotating" and not self._defaults("rotating_freqs", "rotating_norm"):
            raise InputError(f"--rotating-freqs / --rotating-norm apply to --pos rotating, not --pos {self.pos}")
        if self.rotating_freqs not in ROTATING_FREQS:
            raise InputError(f"--rotating-freqs {self.rotating_freqs!r}: expected one of {', '.join(ROTATING_FREQS)}")
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
        sigma = self.residual_diffusion
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0.0 <= sigma <= 10.0:
            raise InputError(f"--residual-diffusion {sigma!r}: expected a noise scale in [0, 10]")
        if self.parallel_paths not in ("",) + PARALLEL_PATHS:
            raise InputError(f"--parallel {self.parallel_paths!r}: expected one of {', '.join(PARALLEL_PATHS)}")
        if self.parallel_paths and self.parallel_residual:
            raise InputError("--parallel (paths) and --parallel-residual: choose one block wiring")
        parts = self.dd_parts
        if "baseline" in parts and "drift" not in parts:
            raise InputError(f"--drift-diffusion {self.drift_diffusion!r}: the per-head baseline is part of the drift "
                             "(a + sigmoid(d)(a - baseline)); add drift")
        bad = [x for x in parts if x not in DD_PARTS]
        if bad or len(set(parts)) != len(parts) or (self.drift_diffusion and not {"drift", "diffusion"} & set(parts)):
            hint = " (the residual-stream noise of earlier versions is --residual-diffusion SIGMA)" if bad else ""
            raise InputError(f"--drift-diffusion {self.drift_diffusion!r}: expected a comma list of "
                             f"{', '.join(DD_PARTS)} with drift or diffusion in it{hint}")
        if self.duo_loss not in DUO_LOSSES:
            raise InputError(f"--duo-loss {self.duo_loss!r}: expected one of {', '.join(DUO_LOSSES)}")
        if not self.duo_predict and self.duo_loss != "intended":
            raise InputError("--duo-loss applies to --duo-predict")
        if self.duo_predict:
            if POSITIONS[self.pos].distance_bias:
                raise InputError(f"--duo-predict with --pos {self.pos}: a mask token shares its real token's "
                                 "position, which an attention bias of index distance cannot express; use --pos "
                                 + "|".join(p.name for p in POSITIONS.values() if not p.distance_bias))
            if self.attention != "full":
                raise InputError("--duo-predict needs --attention full (its attention mask is not causal)")
            if self.alternate_direction:
                raise InputError("--duo-predict and --alternate-direction: choose one training scheme")

    def _defaults(self, *names: str) -> bool:
        """Whether these options keep their default values (options that belong to another choice)."""
        return all(getattr(self, n) == self.__dataclass_fields__[n].default for n in names)

    @property
    def dd_parts(self) -> tuple[str, ...]:
        return _parts(self.drift_diffusion)

    @property
    def vocab_size(self) -> int:
        """GPT-2's BPE vocabulary, plus duo-predict's <|MASK|> as the next id."""
        return GPT2_VOCAB_SIZE + (1 if self.duo_predict else 0)

    @property
    def is_plain_gpt2(self) -> bool:
        """Exactly transformers' GPT-2 (trained and saved as GPT2LMHeadModel)."""
        return self == VariantSpec()

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
        if self.pos == "rotating":
            parts.append(f"rotating={self.rotating_freqs}" + ("+norm" if self.rotating_norm else ""))
        if self.parallel_residual:
            parts.append("parallel-residual")
        if self.parallel_paths:
            parts.append(f"parallel paths ({self.parallel_paths})")
        if self.attention != "full":
            parts.append(f"attention={self.attention}(block {self.linformer_block}, k {self.linformer_k})")
        if self.alternate_direction:
            parts.append("alternate-direction")
        if self.duo_predict:
            parts.append(f"duo-predict ({self.duo_loss} loss)")
        if self.residual_diffusion:
            parts.append(f"residual-diffusion sigma={self.residual_diffusion:g}")
        if self.drift_diffusion:
            parts.append(f"drift-diffusion ({self.drift_diffusion})")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data, where: str) -> "VariantSpec":
        if not isinstance(data, dict):
            raise InputError(f"{where}: 'variant' = {data!r}; expected an object")
        schema = data.get("schema", SCHEMA_VERSION)
        if schema not in (1, SCHEMA_VERSION):
            raise InputError(f"{where}: variant schema {schema!r} is not one this version reads (1, {SCHEMA_VERSION})")
        fields = {k: v for k, v in data.items() if k != "schema"}
        if schema == 1:
            fields = _from_schema1(fields)
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"{where}: variant option(s) {', '.join(unknown)} are not known to this version")
        try:
            return cls(**fields)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        except TypeError as e:
            raise InputError(f"{where}: variant {data!r} is malformed ({e})") from None


# schema 1 option -> schema 2 option: the names the seed's definitions took over
_SCHEMA1_RENAMES = {"parallel": "parallel_residual", "duo_predict": "alternate_direction",
                    "diffusion_sigma": "residual_diffusion"}


def _from_schema1(fields: dict) -> dict:
    out = {_SCHEMA1_RENAMES.get(k, k): v for k, v in fields.items()}
    if out.get("pos") == "rotating":
        out["pos"] = "rope-spread"
    return out


def llama_target(spec: VariantSpec) -> tuple[str | None, str]:
    """(llama.cpp architecture, "") when a graph computes the variant exactly, else (None, why)."""
    p = POSITIONS[spec.pos]
    if p.llama_arch is None:
        return None, p.why_not
    if spec.attention != "full":
        return None, ATTENTIONS[spec.attention].why_not
    if spec.alternate_direction:
        return None, ("alternate-direction's direction embedding (its left-to-right row added to every input) is in "
                      "no llama.cpp graph")
    if spec.parallel_paths:
        return None, (f"parallel paths ({spec.parallel_paths}) run two blocks on one input and merge them; no "
                      "llama.cpp graph holds that (PyTorch only)")
    # residual diffusion and the diffusion of drift-diffusion are training-only noise; the drift folds
    # into attn_output exactly; duo-predict's real-token path is the causal LM with one extra token
    if spec.parallel_residual:
        if p.llama_arch == "gptneox":
            return "gptneox", ""
        return None, (f"parallel residual blocks run in llama.cpp only with RoPE (the gptneox / phi2 graphs); "
                      f"no graph holds them with --pos {spec.pos}")
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
