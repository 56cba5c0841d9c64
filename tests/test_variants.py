"""GPT-2 variants (gpt2cube/variants): each one llama.cpp can run converts to its architecture and
gives PyTorch's logits there; the others are refused with the reason; training, resuming and
PyTorch evaluation work on all of them; bad options and configs get one clear line.

Error measure and tolerance as tests/test_convert_llama.py: max |logit_llama - logit_torch| /
std(logit_torch), f32 weights and KV cache, flash attention off: 0.006 (ggml's GELU table and
summation order; measured <= 0.0021 on these fixtures). Each position scheme also has a negative
control: the same weights scored without that scheme must miss by far more than the tolerance, so
a test cannot pass with the positions ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.errors import CorruptCheckpoint, InputError, ShapeMismatch, UnsupportedArchitecture
from gpt2cube.eval.llama_runner import llama_logits
from gpt2cube.gguf_file import field_value, read_gguf
from gpt2cube.models import dequantized_model, hf_logits, load_hf_model
from gpt2cube.synth import make_random_variant
from gpt2cube.variants.model import VariantConfig, VariantLM
from gpt2cube.variants.spec import POSITIONS, VariantSpec, alibi_slopes, llama_target

F32_TOLERANCE = 0.006
Q8_TOLERANCE = 0.4  # as test_convert_llama.py's q8_0
# llama.cpp against torch on the same ternary values: only activation rounding differs (q8_K
# inputs to the TQ matmuls, q8 inputs to the q6_k head): test_finetune.py's bound
TERNARY_TOLERANCE = 0.25

# name -> (spec, n_embd, n_head, tied, expected llama.cpp architecture)
CONVERTIBLE = {
    "sinusoidal": (VariantSpec(pos="sinusoidal"), 128, 4, True, "gpt2"),
    "rope": (VariantSpec(pos="rope"), 128, 4, True, "gptneox"),
    "rope-partial": (VariantSpec(pos="rope", rope_fraction=0.5, rope_base=500.0), 128, 4, True, "gptneox"),
    "rope-parallel": (VariantSpec(pos="rope", parallel_residual=True), 128, 4, False, "gptneox"),
    "alibi": (VariantSpec(pos="alibi"), 128, 4, True, "mpt"),
    "alibi-6-heads": (VariantSpec(pos="alibi"), 96, 6, False, "mpt"),  # slopes for a non-power-of-two count
    "none": (VariantSpec(pos="none"), 128, 4, True, "mpt"),
    # residual diffusion's noise is training-only: the file is the drift path, converted as its --pos
    "residual-diffusion": (VariantSpec(residual_diffusion=0.3), 128, 4, True, "gpt2"),
    "residual-diffusion-rope": (VariantSpec(pos="rope", residual_diffusion=0.3), 128, 4, True, "gptneox"),
    # the seed's drift-diffusion: the drift (and baseline) fold into attn_output, the diffusion is training-only
    "drift-diffusion": (VariantSpec(drift_diffusion="drift,diffusion,baseline"), 128, 4, True, "gpt2"),
    "drift-rope": (VariantSpec(pos="rope", drift_diffusion="drift"), 128, 4, False, "gptneox"),
    # the seed's duo-predict: the real-token path is the causal LM, vocabulary + 1 (<|MASK|>)
    "duo-predict": (VariantSpec(duo_predict=True), 128, 4, True, "gpt2"),
    "duo-predict-rope": (VariantSpec(pos="rope", duo_predict=True, duo_loss="original"), 128, 4, True, "gptneox"),
}
LINFORMER = VariantSpec(attention="linformer", linformer_block=8, linformer_k=3)
# the structures beside the position schemes, each with a position scheme it combines with
STRUCTURES = [LINFORMER, VariantSpec(pos="rope", attention="linformer", linformer_block=8, linformer_k=2),
              VariantSpec(alternate_direction=True), VariantSpec(pos="alibi", alternate_direction=True),
              VariantSpec(residual_diffusion=0.5), VariantSpec(pos="kerple", residual_diffusion=0.5),
              VariantSpec(drift_diffusion="drift,diffusion,baseline"), VariantSpec(drift_diffusion="diffusion"),
              VariantSpec(parallel_paths="mean"), VariantSpec(pos="rope", parallel_paths="concat"),
              VariantSpec(parallel_paths="add", drift_diffusion="drift"), VariantSpec(duo_predict=True),
              VariantSpec(pos="rotating", rotating_freqs="gp", rotating_norm=True)]


def _err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / ref.std())


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (spec, n_embd, n_head, tied, _) in CONVERTIBLE.items():
        src, model = make_random_variant(root / name, spec, n_embd=n_embd, n_head=n_head, tied=tied, init_std=0.1,
                                         seed=len(out))
        gguf = root / f"{name}.gguf"
        convert(src, gguf, "f32", progress=False)
        out[name] = (src, model, gguf)
    return out


def _without_positions(model: VariantLM) -> VariantLM:
    """The same weights with the position scheme removed (pos none), the negative control."""
    cfg = model.config
    plain = VariantLM(VariantConfig(**{**cfg.__dict__, "variant": dataclasses.replace(
        cfg.variant, pos="none", rope_fraction=1.0, rope_base=10000.0)}))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.wpe.")}
    plain.load_state_dict(state)
    return plain.eval()


@pytest.mark.parametrize("name", list(CONVERTIBLE))
def test_llama_cpp_logits_equal_pytorch(variant_files, prompt_tokens, name):
    src, model, gguf = variant_files[name]
    assert field_value(read_gguf(gguf), "general.architecture") == CONVERTIBLE[name][4]
    ref = hf_logits(model, prompt_tokens)
    got = llama_logits(gguf, prompt_tokens)
    assert got.shape == ref.shape
    err = _err(got, ref)
    assert err <= F32_TOLERANCE, f"{name}: normalised max error {err:.4f}"
    if CONVERTIBLE[name][0].pos != "none":
        control = _err(got, hf_logits(_without_positions(model), prompt_tokens))
        assert control > 20 * F32_TOLERANCE, f"{name}: positions removed still within {control:.4f}"


def test_reloaded_checkpoint_gives_the_same_logits(variant_files, prompt_tokens):
    for name, (src, model, _) in variant_files.items():
        again = load_hf_model(src)
        assert isinstance(again, VariantLM)
        np.testing.assert_array_equal(hf_logits(again, prompt_tokens), hf_logits(model, prompt_tokens), err_msg=name)


def test_rope_hparams_in_the_file(variant_files):
    reader = read_gguf(variant_files["rope-partial"][2])
    assert field_value(reader, "gptneox.rope.dimension_count") == 16  # half of head size 32
    assert field_value(reader, "gptneox.rope.freq_base") == pytest.approx(500.0)
    assert field_value(reader, "gptneox.use_parallel_residual") is False
    assert field_value(read_gguf(variant_files["rope-parallel"][2]), "gptneox.use_parallel_residual") is True
    assert field_value(read_gguf(variant_files["alibi"][2]), "mpt.attention.max_alibi_bias") == pytest.approx(8.0)
    assert field_value(read_gguf(variant_files["none"][2]), "mpt.attention.max_alibi_bias") is None


def test_quantized_variants_run_in_llama_cpp(variant_files, prompt_tokens, tmp_path):
    for name in ("rope", "alibi"):
        src, model, _ = variant_files[name]
        out = tmp_path / f"{name}-q8_0.gguf"
        convert(src, out, "q8_0", progress=False)
        assert _err(llama_logits(out, prompt_tokens), hf_logits(model, prompt_tokens)) <= Q8_TOLERANCE
        ternary = tmp_path / f"{name}-tq2_0.gguf"
        convert(src, ternary, "tq2_0", progress=False)
        # against the variant model holding the file's own (dequantized) weights
        ref = hf_logits(dequantized_model(ternary, src), prompt_tokens)
        err = _err(llama_logits(ternary, prompt_tokens), ref)
        assert err <= TERNARY_TOLERANCE, (name, err)


def test_learned_positions_equal_transformers_gpt2(checkpoints, prompt_tokens):
    """The family's blocks against an independent implementation: transformers' GPT-2 weights
    loaded into the variant model with learned positions give transformers' logits."""
    _, hf = checkpoints["untied"]
    c = hf.config
    model = VariantLM(VariantConfig(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_positions=c.n_positions,
                                    n_inner=c.n_inner, tie_word_embeddings=False, variant=VariantSpec(pos="learned")))
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in unexpected)
    ref = hf_logits(hf, prompt_tokens)
    assert _err(hf_logits(model.eval(), prompt_tokens), ref) < 1e-4


@pytest.mark.parametrize("pos", list(POSITIONS))
@pytest.mark.parametrize("parallel", [False, True])
def test_every_variant_is_causal(pos, parallel):
    """Changing later tokens never changes earlier logits (the bias schemes build their own masks)."""
    torch.manual_seed(0)
    model = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32,
                                    variant=VariantSpec(pos=pos, parallel_residual=parallel))).eval()
    a = torch.randint(0, 50257, (1, 24))
    b = a.clone()
    b[0, 12:] = torch.randint(0, 50257, (12,))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[0, :12], lb[0, :12], rtol=0, atol=1e-5)
    assert not torch.allclose(la[0, 12:], lb[0, 12:])


@pytest.mark.parametrize("spec", STRUCTURES, ids=lambda s: s.describe())
def test_the_structures_are_causal(spec):
    torch.manual_seed(0)
    model = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, variant=spec)).eval()
    a = torch.randint(0, 50257, (1, 30))
    b = a.clone()
    b[0, 17:] = torch.randint(0, 50257, (13,))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
        again = model(a).logits
    torch.testing.assert_close(la[0, :17], lb[0, :17], rtol=0, atol=1e-5)
    assert not torch.allclose(la[0, 17:], lb[0, 17:])
    torch.testing.assert_close(again, la, rtol=0, atol=0)  # evaluation is deterministic (no diffusion noise)


def _linformer_by_loops(q, k, v, e, f, block):
    """Independent reference of linformer.py's definition, one query at a time: the mixtures
    E @ K_j, F @ V_j of every complete block j before the query's block, plus the keys of its
    own block up to itself, softmax(q . key / sqrt(d))."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                c = t // block
                keys = [k[b, h, c * block: t + 1]]
                vals = [v[b, h, c * block: t + 1]]
                for j in range(c):
                    keys.append(e @ k[b, h, j * block: (j + 1) * block])
                    vals.append(f @ v[b, h, j * block: (j + 1) * block])
                kk, vv = torch.cat(keys), torch.cat(vals)
                w = torch.softmax(kk @ q[b, h, t] / d ** 0.5, dim=0)
                out[b, h, t] = w @ vv
    return out


def test_causal_linformer_matches_its_definition():
    from gpt2cube.variants.linformer import CausalLinformer

    torch.manual_seed(1)
    lin = CausalLinformer(block=5, k=2)
    with torch.no_grad():  # trained-looking projections, not the pooling they start from
        lin.e.normal_()
        lin.f.normal_()
    q, k, v = (torch.randn(2, 3, 23, 8, dtype=torch.float64) for _ in range(3))  # 4 full blocks and a partial one
    with torch.no_grad():
        got = lin.double()(q, k, v)
    ref = _linformer_by_loops(q, k, v, lin.e.detach(), lin.f.detach(), 5)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_linformer_within_one_block_is_full_attention():
    """Up to --linformer-block tokens nothing is compressed: the logits are full attention's."""
    torch.manual_seed(2)
    lin = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32, variant=LINFORMER)).eval()
    full = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32)).eval()
    full.load_state_dict({k: v for k, v in lin.state_dict().items() if ".linformer." not in k})
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(lin(ids[:, :8]).logits, full(ids[:, :8]).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lin(ids).logits[:, 8:], full(ids).logits[:, 8:], atol=1e-3)


def test_alternate_direction_alternates_directions():
    from gpt2cube.train.trainer import _loss

    torch.manual_seed(3)
    model = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32,
                                    variant=VariantSpec(alternate_direction=True)))
    xy = torch.randint(0, 50257, (3, 17))
    for step, backward_rows in ((0, [1]), (1, [0, 2])):
        inputs, targets, extra = model.training_inputs(xy, step)
        assert extra["reverse"].tolist() == [i in backward_rows for i in range(3)]
        for i in range(3):
            seq = xy[i].flip(0) if i in backward_rows else xy[i]
            assert torch.equal(inputs[i], seq[:-1]) and torch.equal(targets[i], seq[1:])
    model.eval()
    with torch.no_grad():  # the right-to-left row of the direction embedding is what reverse selects
        back = model(xy[:, :16], reverse=torch.tensor([True, False, True])).logits
        fwd = model(xy[:, :16]).logits
        swapped = VariantLM(model.config).eval()
        swapped.load_state_dict(model.state_dict())
        swapped.transformer.wde.weight[0] = model.transformer.wde.weight[1]
        torch.testing.assert_close(back[0], swapped(xy[:1, :16]).logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(back[1], fwd[1], rtol=0, atol=0)
        assert not torch.allclose(back[0], fwd[0], atol=1e-3)
    model.train()  # the training loss reads the reversed windows; evaluation reads left to right
    with torch.no_grad():
        trained_on = float(_loss(model, xy, step=0))
        assert trained_on != pytest.approx(float(_loss(model.eval(), xy)), rel=1e-6)


def test_residual_diffusion_noise_has_the_stated_scale():
    """With every block's output zeroed the stream is x0 plus the diffusion alone: L increments
    of std sigma * rms(x) / sqrt(L), so sigma * rms(x0) in all (rms barely moves, sigma small)."""
    torch.manual_seed(4)
    sigma, L = 0.05, 4
    model = VariantLM(VariantConfig(n_layer=L, n_embd=64, n_head=4, n_positions=32,
                                    variant=VariantSpec(residual_diffusion=sigma)))
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    captured = {}
    model.transformer.ln_f.register_forward_hook(lambda m, inp, out: captured.__setitem__("x", inp[0]))
    ids = torch.randint(0, 50257, (8, 32))
    with torch.no_grad():
        x0 = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(32))
        model.train()(ids)
        noise = captured["x"] - x0
        rms = x0.pow(2).mean(-1, keepdim=True).sqrt()
        ratio = float((noise / rms).std())
        model.eval()(ids)
    assert ratio == pytest.approx(sigma, rel=0.05)  # 8 x 32 x 64 samples: std of the estimate ~0.3 %
    torch.testing.assert_close(captured["x"], x0, rtol=0, atol=0)  # evaluation: the drift path, no noise


# --- the seed's four variants (shiva-upsurge/parallel_transformer d868f70), against their definitions ---

def _ln(v, w, b, eps=1e-5):
    mu = v.mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(((v - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def _duo_allowed_by_loops(T: int) -> torch.Tensor:
    """The seed's duo-predict attention, written out: index 2k is x_k, 2k+1 is M_k; x_k sees x_0..x_k;
    M_k sees x_0..x_{k-1}, itself and x_{k+1}."""
    n = 2 * T - 1
    allowed = [[False] * n for _ in range(n)]
    for k in range(T):
        for j in range(k + 1):
            allowed[2 * k][2 * j] = True
    for k in range(T - 1):
        for j in range(k):
            allowed[2 * k + 1][2 * j] = True
        allowed[2 * k + 1][2 * k + 1] = True
        allowed[2 * k + 1][2 * k + 2] = True
    return torch.tensor(allowed)


def _reference_logits(model: VariantLM, ids: torch.Tensor, duo: bool = False) -> torch.Tensor:
    """float64 re-derivation of the seed's variants from their definitions and the state dict alone
    (learned or no positions, or rotating heads; drift-diffusion in evaluation; parallel paths;
    duo-predict's interleaved sequences): no module of gpt2cube.variants is called."""
    cfg, spec = model.config, model.config.variant
    W = {k: v.detach().double() for k, v in model.state_dict().items()}
    E, H = cfg.n_embd, cfg.n_head
    D, B, N = E // H, ids.shape[0], ids.shape[1]
    if duo:
        T = (N + 1) // 2
        pos, allowed = torch.tensor([i // 2 for i in range(N)]), _duo_allowed_by_loops(T)
    else:
        pos, allowed = torch.arange(N), torch.ones(N, N, dtype=torch.bool).tril()
    x = W["transformer.wte.weight"][ids]
    if "transformer.wpe.weight" in W:
        x = x + W["transformer.wpe.weight"][pos]

    def rotate(t, f):  # interleaved pairs (2i, 2i+1) of head h turn by pos * f[h, i]
        out = t.clone()
        for h in range(H):
            for i in range(D // 2):
                ang = pos.double() * f[h, i]
                a, b = t[:, h, :, 2 * i], t[:, h, :, 2 * i + 1]
                out[:, h, :, 2 * i] = a * torch.cos(ang) - b * torch.sin(ang)
                out[:, h, :, 2 * i + 1] = a * torch.sin(ang) + b * torch.cos(ang)
        return out

    def block(v, i):
        a = f"transformer.h.{i}."
        qkv = _ln(v, W[a + "ln_1.weight"], W[a + "ln_1.bias"]) @ W[a + "attn.c_attn.weight"] + W[a + "attn.c_attn.bias"]
        q, k, val = (t.reshape(B, N, H, D).transpose(1, 2) for t in qkv.split(E, -1))
        if spec.pos == "rotating":
            if spec.rotating_freqs == "lr":
                f = W[a + "attn.pos.freqs"]
            else:
                f = torch.tensor([[10.0 ** (-h / (H - 1)) * 10000.0 ** (-2 * i / D) for i in range(D // 2)]
                                  for h in range(H)], dtype=torch.float64)
            if spec.rotating_norm:
                f = _ln(f, W[a + "attn.pos.norm.weight"], W[a + "attn.pos.norm.bias"])
            q, k = rotate(q, f), rotate(k, f)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf"))
        o = (torch.softmax(scores, -1) @ val).transpose(1, 2)  # [B, N, H, D]
        if a + "attn.dd_drift" in W:  # a' = a + sigmoid(d) (a - beta)
            g = torch.sigmoid(W[a + "attn.dd_drift"])
            o = o + g * (o - W.get(a + "attn.dd_baseline", torch.zeros(H, D, dtype=torch.float64)))
        v = v + o.reshape(B, N, E) @ W[a + "attn.c_proj.weight"] + W[a + "attn.c_proj.bias"]
        m = _ln(v, W[a + "ln_2.weight"], W[a + "ln_2.bias"]) @ W[a + "mlp.c_fc.weight"] + W[a + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        return v + m @ W[a + "mlp.c_proj.weight"] + W[a + "mlp.c_proj.bias"]

    if spec.parallel_paths:
        for k in range(cfg.n_layer // 2):
            left, right = block(x, 2 * k), block(x, 2 * k + 1)
            if spec.parallel_paths == "concat":
                x = torch.cat([left, right], -1) @ W["transformer.bottleneck.weight"].T + W["transformer.bottleneck.bias"]
            else:
                x = (left + right) / (2 if spec.parallel_paths == "mean" else 1)
    else:
        for i in range(cfg.n_layer):
            x = block(x, i)
    return _ln(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"]) @ W["transformer.wte.weight"].T


SEED_VARIANTS = [VariantSpec(drift_diffusion="drift,diffusion,baseline"), VariantSpec(drift_diffusion="drift"),
                 VariantSpec(drift_diffusion="diffusion"), VariantSpec(parallel_paths="mean"),
                 VariantSpec(parallel_paths="concat"), VariantSpec(parallel_paths="add", drift_diffusion="drift,baseline"),
                 VariantSpec(pos="rotating"), VariantSpec(pos="rotating", rotating_norm=True),
                 VariantSpec(pos="rotating", rotating_freqs="gp"),
                 VariantSpec(pos="rotating", rotating_freqs="gp", rotating_norm=True),
                 VariantSpec(duo_predict=True), VariantSpec(pos="rotating", duo_predict=True, duo_loss="original"),
                 VariantSpec(pos="none", duo_predict=True, parallel_paths="concat")]


def _seed_model(spec: VariantSpec, n_layer: int = 4, seed: int = 5) -> VariantLM:
    """A random model of `spec` whose every parameter is away from its init (norms, biases, the
    drift baseline, the rotating heads' LayerNorm), in float64."""
    torch.manual_seed(seed)
    model = VariantLM(VariantConfig(n_layer=n_layer, n_embd=32, n_head=4, n_positions=16, initializer_range=0.2,
                                    vocab_size=50258 if spec.duo_predict else 50257, variant=spec))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "dd_baseline")) or ".ln_" in name or ".norm." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


# float64 throughout, except that the gp frequencies are stored in float32 (as every rotary table
# here): angles then differ by ~1e-7 x position, logits (std ~3) by <= 6e-8 measured
DEFINITION_TOLERANCE = 1e-6


@pytest.mark.parametrize("spec", SEED_VARIANTS, ids=lambda s: s.describe())
def test_seed_variants_match_their_definition(spec):
    model = _seed_model(spec)
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        got = model(ids).logits
    tol = dict(rtol=DEFINITION_TOLERANCE, atol=DEFINITION_TOLERANCE)
    torch.testing.assert_close(got, _reference_logits(model, ids), **tol)
    if spec.duo_predict:  # the interleaved training sequences too, mask token and shared positions included
        inputs, _ = __import__("gpt2cube.variants.duo", fromlist=["x"]).duo_training_pair(
            torch.randint(0, 50257, (2, 9)), model.mask_token_id, spec.duo_loss)
        with torch.no_grad():
            got = model(inputs, duo=True).logits
        torch.testing.assert_close(got, _reference_logits(model, inputs, duo=True), **tol)


def test_drift_diffusion_noise_and_switches():
    """Training adds s * N(0, 1) to each head's drifted output (seen through an identity c_proj);
    evaluation adds nothing; without the diffusion part training adds nothing either."""
    for parts, noisy in (("drift,diffusion,baseline", True), ("diffusion", True), ("drift,baseline", False)):
        torch.manual_seed(6)
        attn = VariantLM(VariantConfig(n_layer=2, n_embd=64, n_head=4, n_positions=32,
                                       variant=VariantSpec(drift_diffusion=parts))).transformer.h[0].attn
        with torch.no_grad():
            attn.c_proj.weight.copy_(torch.eye(64))
            attn.c_proj.bias.zero_()
            x = torch.randn(8, 32, 64)
            clean = attn.eval()(x)
            trained = attn.train()(x)
        if not noisy:
            torch.testing.assert_close(trained, clean, rtol=0, atol=0)
            continue
        eps = (trained - clean).view(8, 32, 4, 16) / attn.dd_diffusion.detach()
        assert float(eps.mean()) == pytest.approx(0.0, abs=0.03)  # 16,384 draws: standard error 0.008
        assert float(eps.std()) == pytest.approx(1.0, rel=0.03)


def test_duo_predict_sequences_follow_the_definition():
    from gpt2cube.variants.duo import duo_mask, duo_positions, duo_training_pair

    for T in range(2, 8):
        assert torch.equal(duo_mask(T), _duo_allowed_by_loops(T))
        assert duo_positions(T).tolist() == [i // 2 for i in range(2 * T - 1)]
    xy = torch.randint(0, 50257, (3, 9))  # windows of T + 1 = 9 tokens
    T, mask_id = 8, 50257
    inputs, intended = duo_training_pair(xy, mask_id, "intended")
    assert inputs.shape == (3, 2 * T - 1)
    for k in range(T):
        assert torch.equal(inputs[:, 2 * k], xy[:, k]) and torch.equal(intended[:, 2 * k], xy[:, k + 1])
    for k in range(T - 1):
        assert (inputs[:, 2 * k + 1] == mask_id).all() and torch.equal(intended[:, 2 * k + 1], xy[:, k])
    # the seed's committed loss, literally: labels already shifted (x_k -> x_{k+1}, M_k -> x_k) on the
    # logits without the last position, then shifted once more by the causal-LM loss
    labels = xy[:, :T]
    total = torch.full((3, 2 * T - 2), -100)
    total[:, :-1:2] = labels[:, 1:]
    total[:, 1::2] = labels[:, :-1]
    seed_targets = total[:, 1:]  # for logits 0 .. 2T-4
    _, original = duo_training_pair(xy, mask_id, "original")
    assert torch.equal(original[:, : 2 * T - 3], seed_targets)
    assert torch.equal(original[:, 2 * T - 3], xy[:, T]) and torch.equal(original[:, 2 * T - 2], xy[:, T - 1])


def test_duo_predict_real_tokens_are_the_causal_lm():
    """Real tokens never see a mask and sit at positions 0..T-1: their logits in the interleaved
    sequence are the plain model's on the real tokens alone (the path that converts). In one layer
    a mask's logits do not depend on the token it stands for but do on the one after it; from two
    layers on they do depend on it, through x_{k+1}'s state, which has read x_k (the seed's mask
    leaks the answer of the intended M_k -> x_k task to every model deeper than one layer)."""
    from gpt2cube.variants.duo import duo_training_pair

    for n_layer in (1, 2):
        model = _seed_model(VariantSpec(duo_predict=True), n_layer=n_layer)
        xy = torch.randint(0, 50257, (2, 11))
        inputs, _ = duo_training_pair(xy, model.mask_token_id, "intended")
        with torch.no_grad():
            inter = model(inputs, duo=True).logits
            torch.testing.assert_close(inter[:, 0::2], model(xy[:, :10]).logits, rtol=1e-9, atol=1e-9)
            changed = inputs.clone()
            changed[:, 8] = (changed[:, 8] + 1) % 50257  # x_4
            again = model(changed, duo=True).logits
        assert not torch.allclose(again[:, 7], inter[:, 7])  # M_3 sees x_4
        if n_layer == 1:
            torch.testing.assert_close(again[:, 9], inter[:, 9], rtol=0, atol=1e-12)  # M_4 cannot see x_4
        else:
            assert not torch.allclose(again[:, 9], inter[:, 9])  # ... but x_5 has, and M_4 reads x_5
    with pytest.raises(InputError, match="exceed the model's 16 positions"):
        model(torch.randint(0, 50257, (1, 2 * 17 - 1)), duo=True)


def test_duo_predict_file_has_the_mask_token(variant_files):
    from gpt2cube.converter.tokenizer import load_vocab

    src = variant_files["duo-predict"][0]
    vocab, _ = load_vocab(src, json.loads((src / "config.json").read_text()), 50258)
    assert vocab.tokens[50257] == "<|MASK|>" and len(vocab.tokens) == 50258
    from gguf import TokenType

    assert vocab.types[50257] == int(TokenType.CONTROL)


def test_drift_fold_is_needed(variant_files, prompt_tokens):
    """Negative control of the fold: the same weights without the drift miss llama.cpp's logits by far."""
    src, model, gguf = variant_files["drift-diffusion"]
    plain = VariantLM(VariantConfig(**{**model.config.__dict__, "variant": VariantSpec()})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".dd_" not in k})
    assert _err(llama_logits(gguf, prompt_tokens), hf_logits(plain, prompt_tokens)) > 20 * F32_TOLERANCE


def test_schema1_checkpoints_load_with_the_renamed_options():
    old = {"schema": 1, "pos": "rotating", "parallel": True, "duo_predict": True, "diffusion_sigma": 0.2}
    spec = VariantSpec.from_json(old, "config.json")
    assert spec == VariantSpec(pos="rope-spread", parallel_residual=True, alternate_direction=True,
                               residual_diffusion=0.2)
    assert VariantSpec.from_json(spec.to_json(), "config.json") == spec


def test_alibi_slopes_follow_press_et_al():
    assert alibi_slopes(8, 8.0) == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    # 6 heads: the 4-head series, then the odd terms of the 8-head series
    assert alibi_slopes(6, 8.0) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.parametrize("spec, reason", [
    (VariantSpec(pos="fire"), "FIRE"),
    (VariantSpec(pos="kerple"), "KERPLE"),
    (VariantSpec(pos="rope-spread"), "one frequency set"),
    (VariantSpec(pos="rotating"), "interleaved pairs have no ggml graph"),
    (VariantSpec(pos="rotating", rotating_freqs="gp", rotating_norm=True), "interleaved pairs have no ggml graph"),
    (VariantSpec(pos="alibi", parallel_residual=True), "parallel residual blocks run in llama.cpp only with RoPE"),
    (VariantSpec(pos="sinusoidal", parallel_residual=True), "parallel residual blocks run in llama.cpp only with RoPE"),
    (LINFORMER, "Linformer's learned sequence projections"),
    (VariantSpec(pos="rope", alternate_direction=True), "direction embedding"),
    (VariantSpec(parallel_paths="mean"), "PyTorch only"),
    (VariantSpec(pos="rope", parallel_paths="concat", drift_diffusion="drift"), "PyTorch only"),
])
def test_unrepresentable_variants_are_refused(tmp_path, spec, reason):
    assert llama_target(spec)[0] is None
    src, _ = make_random_variant(tmp_path / "m", spec, n_embd=64, n_head=2)
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--type", "f16"])
    assert res.exit_code == 2
    assert reason in res.output and spec.pos in res.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_config_errors_are_one_clear_line(tmp_path):
    src, _ = make_random_variant(tmp_path / "m", VariantSpec(pos="rope"), n_embd=64, n_head=2)
    cfg_path = src / "config.json"
    good = json.loads(cfg_path.read_text())
    for variant, expect in (({**good["variant"], "pos": "xpos"}, "'xpos' is not known to this version"),
                            ({**good["variant"], "schema": 9}, "schema 9"),
                            ({**good["variant"], "window": 3}, "window"),
                            ("rope", "expected an object")):
        cfg_path.write_text(json.dumps({**good, "variant": variant}))
        with pytest.raises(UnsupportedArchitecture, match=expect):
            convert(src, tmp_path / "x.gguf", "f16", progress=False)
        with pytest.raises(InputError, match=expect):
            load_hf_model(src)
    assert not (tmp_path / "x.gguf").exists()
    # weights of another variant: rope's checkpoint declared as learned has no position table
    cfg_path.write_text(json.dumps({**good, "variant": {"schema": 1, "pos": "learned", "parallel": True}}))
    with pytest.raises(CorruptCheckpoint, match="transformer.wpe.weight"):
        load_hf_model(src)


def test_drift_tensors_are_checked_before_writing(tmp_path):
    """The tensors the drift fold reads: a missing or misshapen one is named, and no file is left."""
    from safetensors.torch import load_file, save_file

    src, _ = make_random_variant(tmp_path / "m", VariantSpec(drift_diffusion="drift,baseline"), n_embd=64, n_head=2)
    weights = src / "model.safetensors"
    good = load_file(str(weights))
    name = "transformer.h.1.attn.dd_baseline"
    for state, error, expect in (({k: v for k, v in good.items() if k != name}, CorruptCheckpoint, "is missing"),
                                 ({**good, name: good[name].reshape(-1)}, ShapeMismatch, r"expected \[2, 32\]")):
        save_file(state, str(weights))
        with pytest.raises(error, match=f"{name}.*{expect}"):
            convert(src, tmp_path / "x.gguf", "f32", progress=False)
        assert not (tmp_path / "x.gguf").exists()


def test_hypercube_and_finetune_say_gpt2_only(tmp_path, calib_file):
    src, _ = make_random_variant(tmp_path / "m", VariantSpec(pos="rope"), n_embd=64, n_head=2)
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "h.gguf"), "--hypercube-dim", "2",
                                  "--calib", str(calib_file)])
    assert r.exit_code == 2 and "GPT-2 only" in r.output and "gptneox" in r.output
    r = CliRunner().invoke(main, ["prune", str(src), "--out", str(tmp_path / "p"), "--ffn", "0.5",
                                  "--calib", str(calib_file)])
    assert r.exit_code == 2 and "takes GPT-2 checkpoints" in r.output


def _train(corpus, out, *extra):
    return CliRunner().invoke(main, ["train", "--corpus", str(corpus), "--out", str(out), "--n-layer", "2",
                                     "--n-embd", "64", "--n-head", "2", "--ctx", "32", "--tokens", str(32 * 4 * 6),
                                     "--batch-size", "4", "--eval-every", "3", "--holdout", "b.txt", "--quiet",
                                     "--json", *extra])


@pytest.mark.parametrize("args", [["--pos", "rope"], ["--pos", "fire"], ["--residual-diffusion", "0.5"],
                                  ["--alternate-direction", "--pos", "rope"], ["--drift-diffusion"],
                                  ["--parallel", "concat"], ["--duo-predict", "--duo-loss", "original"],
                                  ["--pos", "rotating", "--rotating-norm"],
                                  ["--attention", "linformer", "--linformer-block", "8", "--linformer-k", "2"]],
                         ids=lambda a: "-".join(x.strip("-") for x in a))
def test_train_resume_and_score_a_variant(corpus, tmp_path, args):
    args = [*args, "--warmup-steps", "1", "--lr", "3e-3"]  # 6 steps at a rate that learns
    out = tmp_path / "run"
    r = _train(corpus, out, *args, "--stop-at", "3")
    assert r.exit_code == 0, r.output
    r = _train(corpus, out, *args, "--resume")
    assert r.exit_code == 0, r.output
    whole = tmp_path / "whole"
    assert _train(corpus, whole, *args).exit_code == 0
    a, b = load_hf_model(out), load_hf_model(whole)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)  # resuming is exact
    r = CliRunner().invoke(main, ["eval", "perplexity", str(out), "--text", str(corpus / "b.txt"), "--ctx", "32",
                                  "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)[0]
    # learnt: the held-out PPL well below the first step's training loss (the untrained model),
    # except duo-predict with the seed's alignment, whose real tokens are trained to predict
    # themselves: its next-token path is scored, finite but worse
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    bound = math.inf if "original" in args else 0.5 * math.exp(first)
    assert res["engine"] == "pytorch" and 1 < res["ppl"] < bound, (res["ppl"], math.exp(first))
    r = _train(corpus, out, "--pos", "alibi", "--resume")
    assert r.exit_code == 2 and "variant" in r.output


def test_rope_variant_scores_beyond_its_training_context(corpus, tmp_path):
    src, _ = make_random_variant(tmp_path / "m", VariantSpec(pos="rope"), n_embd=64, n_head=2, n_positions=16)
    r = CliRunner().invoke(main, ["eval", "perplexity", str(src), "--text", str(corpus / "b.txt"), "--ctx", "64",
                                  "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    sin, _ = make_random_variant(tmp_path / "s", VariantSpec(pos="sinusoidal"), n_embd=64, n_head=2, n_positions=16)
    r = CliRunner().invoke(main, ["eval", "perplexity", str(sin), "--text", str(corpus / "b.txt"), "--ctx", "64"])
    assert r.exit_code == 2 and "context length 16" in r.output


@pytest.mark.parametrize("args, expect", [
    (["--pos", "alibi", "--rope-fraction", "0.5"], "apply to rotary positions"),
    (["--pos", "rope", "--rope-fraction", "1.5"], "expected a fraction in (0, 1]"),
    (["--pos", "rope", "--rope-fraction", "0.01"], "at least 2 are needed"),
    (["--pos", "xpos"], "Invalid value for '--pos'"),
    (["--linformer-k", "4"], "apply to --attention linformer"),
    (["--attention", "linformer", "--linformer-block", "8", "--linformer-k", "8"], "must be below"),
    (["--attention", "linformer", "--linformer-block", "0"], "--linformer-block 0: expected a positive integer"),
    (["--attention", "linformer", "--pos", "alibi"], "has no meaning for it"),
    (["--attention", "linformer", "--linformer-block", "32"], "is not below the context 32"),
    (["--residual-diffusion", "-1"], "expected a noise scale in [0, 10]"),
    (["--parallel", "mean", "--n-layer", "3"], "n_layer 3 is odd"),
    (["--parallel", "sum"], "Invalid value for '--parallel'"),
    (["--parallel", "--parallel-residual"], "choose one block wiring"),
    (["--drift-diffusion", "0.5"], "the residual-stream noise of earlier versions is --residual-diffusion"),
    (["--drift-diffusion", "baseline"], "add drift"),
    (["--drift-diffusion", "drift,drift"], "expected a comma list"),
    (["--duo-loss", "original"], "--duo-loss applies to --duo-predict"),
    (["--duo-predict", "--pos", "alibi"], "cannot express"),
    (["--duo-predict", "--alternate-direction"], "choose one training scheme"),
    (["--duo-predict", "--ctx", "1"], "at least 2"),
    (["--rotating-norm"], "apply to --pos rotating"),
    (["--pos", "rope", "--rotating-freqs", "gp"], "apply to --pos rotating"),
    (["--pos", "rotating", "--n-embd", "66"], "head size 33"),
    (["--pos", "rotating", "--rope-base", "500"], "apply to rotary positions"),
    (["--attention", "performer"], "Invalid value for '--attention'"),
])
def test_bad_variant_options(corpus, tmp_path, args, expect):
    out = tmp_path / "o"
    r = _train(corpus, out, *args)
    assert r.exit_code == 2 and expect in r.output
    assert not (out / "model.safetensors").exists()


def test_plain_gpt2_stays_transformers(corpus, tmp_path):
    out = tmp_path / "plain"
    assert _train(corpus, out).exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and "variant" not in cfg
    shutil.rmtree(out)


# --- neural baselines (variants/neural.py) -----------------------------------------------------

def _neural(kind: str, **kw):
    from gpt2cube.variants.neural import NeuralConfig, NeuralLM

    torch.manual_seed(0)
    return NeuralLM(NeuralConfig(kind=kind, n_embd=32, n_hidden=48, **kw)).eval()


@pytest.mark.parametrize("kind", ["ffnn", "rnn", "lstm"])
def test_neural_models_are_causal(kind):
    model = _neural(kind)
    a = torch.randint(0, 50257, (2, 20))
    b = a.clone()
    b[:, 10:] = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert la.shape == (2, 20, 50257)
    torch.testing.assert_close(la[:, :10], lb[:, :10], rtol=0, atol=1e-5)
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_ffnn_sees_exactly_order_minus_one_tokens():
    model = _neural("ffnn", order=4)  # history: tokens t-2, t-1, t
    a = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        base = model(a).logits[0, 8]
        for j, inside in ((5, False), (6, True), (7, True), (8, True)):
            b = a.clone()
            b[0, j] = (b[0, j] + 1) % 50257
            changed = not torch.allclose(model(b).logits[0, 8], base)
            assert changed == inside, f"token {j} {'should' if inside else 'should not'} reach position 8"


def test_neural_baseline_trains_scores_and_reloads(corpus, tmp_path):
    out = tmp_path / "lstm"
    args = ["baseline", "neural", "--model", "lstm", "--train", str(corpus), "--holdout", "b.txt",
            "--test", str(corpus / "b.txt"),
            "--out", str(out), "--tokens", str(32 * 4 * 12), "--ctx", "32", "--batch-size", "4", "--n-embd", "32",
            "--hidden", "32", "--warmup-steps", "2", "--lr", "1e-2", "--quiet", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["engine"] == "pytorch" and res["model"] == "lstm" and res["train_tokens"] == 32 * 4 * 12
    assert 1 < res["ppl"] < 50257 / 10 and res["parameters"] > 50257 * 32  # learnt: far below uniform
    r = CliRunner().invoke(main, ["eval", "perplexity", str(out), "--text", str(corpus / "b.txt"), "--ctx", "32",
                                  "--quiet", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["ppl"] == pytest.approx(res["ppl"], rel=1e-4)
    r = CliRunner().invoke(main, [*args[:-2], "--order", "1", "--quiet"])
    assert r.exit_code == 2 and "order" in r.output
    r = CliRunner().invoke(main, ["convert", str(out), "-o", str(tmp_path / "n.gguf")])
    assert r.exit_code == 2 and "GPT2CubeNeuralLM" in r.output and not (tmp_path / "n.gguf").exists()


# --- PyTorch and llama.cpp evaluations agree on variants, past the training context too ---------

@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_perplexity_past_the_training_context_agrees(tmp_path, pos):
    """Length extrapolation (what RoPE and ALiBi are for): both engines score windows of 4x the
    trained context, and give the same perplexity (relative 1e-3: the f32 logit tolerance above
    moves log-probabilities by far less)."""
    from gpt2cube.eval.perplexity import hf_perplexity, llama_perplexity

    src, _ = make_random_variant(tmp_path / pos, VariantSpec(pos=pos), n_embd=64, n_head=2, n_positions=32,
                                 init_std=0.1)
    gguf = tmp_path / f"{pos}.gguf"
    convert(src, gguf, "f32", progress=False)
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away. " * 12
    a = llama_perplexity(gguf, text, 128)
    b = hf_perplexity(src, text, 128)
    assert a.windows == b.windows >= 1 and a.tokens_scored == b.tokens_scored
    assert a.ppl == pytest.approx(b.ppl, rel=1e-3)


def test_sinusoidal_file_is_bound_to_its_positions(tmp_path):
    from gpt2cube.eval.perplexity import llama_perplexity

    src, _ = make_random_variant(tmp_path / "s", VariantSpec(pos="sinusoidal"), n_embd=64, n_head=2, n_positions=32)
    gguf = tmp_path / "s.gguf"
    convert(src, gguf, "f32", progress=False)
    with pytest.raises(InputError, match="context length 32"):
        llama_perplexity(gguf, "word " * 400, 64)


def test_sinusoid_amplitude_and_a_stored_table_wins(tmp_path):
    """New models' tables have the embeddings' init std as amplitude (per-dimension RMS a / sqrt 2);
    a checkpoint keeps the table it was saved with (an older unit-amplitude one loads as it was)."""
    from safetensors.torch import load_file, save_file

    src, model = make_random_variant(tmp_path / "s", VariantSpec(pos="sinusoidal"), n_embd=64, n_head=2,
                                     n_positions=32, init_std=0.02)
    table = model.transformer.wpe.weight
    assert float(table.pow(2).mean().sqrt()) == pytest.approx(0.02 / 2 ** 0.5, rel=1e-3)
    assert float(table[5, 0]) == pytest.approx(0.02 * np.sin(5.0), rel=1e-5)
    weights = load_file(str(src / "model.safetensors"))
    weights["transformer.wpe.weight"] = weights["transformer.wpe.weight"] / 0.02
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(load_hf_model(src).transformer.wpe.weight, table / 0.02)


def test_hellaswag_in_pytorch_matches_llama_cpp(variant_files, tmp_path):
    from gpt2cube.eval.hellaswag import evaluate_hellaswag

    rng = np.random.default_rng(3)
    words = "the a man woman dog runs walks sits on under table car house quickly slowly red blue".split()
    lines = []
    for _ in range(12):
        lines.append(" ".join(rng.choice(words, 8)))
        lines.append(str(int(rng.integers(0, 4))))
        lines += [" ".join(rng.choice(words, int(rng.integers(2, 6)))) for _ in range(4)]
    data = tmp_path / "hs.txt"
    data.write_text("\n".join(lines) + "\n")
    src, _, gguf = variant_files["rope"]
    torch_run = evaluate_hellaswag(src, data)
    llama_run = evaluate_hellaswag(gguf, data)
    assert torch_run["engine"] == "pytorch" and llama_run["engine"] == "llama.cpp"
    assert torch_run["tasks"] == llama_run["tasks"] == 12
    assert torch_run["accuracy"] == llama_run["accuracy"]
