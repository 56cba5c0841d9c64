"""The C++ routed engine: dense mode against llama.cpp for every weight type, routed mode against
a torch reference of the same routing, the KV cache, CLI commands, and corrupt metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import rewrite_gguf
from gguf import GGUFReader, GGUFValueType

from gpt2cube.cli import main
from gpt2cube.converter import convert
from gpt2cube.converter.plan import Recipe
from gpt2cube.errors import InputError
from gpt2cube.eval.llama_runner import llama_logits, llama_logits_no_repack
from gpt2cube.gguf_file import read_gguf
from gpt2cube.hypercube.build import HypercubeOptions
from gpt2cube.hypercube.metadata import read_hypercube
from gpt2cube.hypercube.routed_ref import routed_forward
from gpt2cube.models import model_from_gguf

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k", "tq1_0", "tq2_0"]


@pytest.fixture(scope="module")
def engine_lib():
    from gpt2cube.engine.build import library_path

    return library_path(log=lambda m: None)  # a failed build is a failure here, not a skip


@pytest.fixture(scope="module")
def cube_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="module")
def cube_file(checkpoints, cube_dir, calib_file):
    """Hypercube files (d = 2 over 2 x 256, n_ff 1024: groups of 256 fit every block size) by type."""
    src, _ = checkpoints["small"]
    calib = calib_file
    made: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in made:
            made[qtype] = cube_dir / f"cube-{qtype}.gguf"
            convert(src, made[qtype], qtype, progress=False, log=lambda m: None,
                    hypercube=HypercubeOptions(2, calib, 2048))
        return made[qtype]

    return get


def _model(path: Path, kv_type: str = "f32", **kw):
    """f32 KV cache unless asked: the references (llama.cpp as llama_logits_no_repack runs it,
    torch) keep K and V in f32."""
    from gpt2cube.engine.binding import RoutedModel

    return RoutedModel(path, n_threads=2, kv_type=kv_type, **kw)


@pytest.mark.parametrize("qtype", TYPES)
def test_dense_mode_equals_llama_cpp(engine_lib, cube_file, prompt_tokens, qtype):
    path = cube_file(qtype)
    ref = llama_logits(path, prompt_tokens)  # llama.cpp's defaults: CPU weight repacking on
    with _model(path) as m:
        got, verts = m.eval(prompt_tokens)
    assert verts is None
    # Same ggml kernels on the same file, repacked layouts included: measured 0 for every type
    # except f16 (up to 1.4e-3 x std on some prompts, from llama.cpp's batch-size-dependent f16
    # path). Repacked and plain Q4_0/Q4_K differ by 0.015-0.045 (see the next test).
    assert np.abs(got - ref).max() / ref.std() < 2e-3


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_repacking_off_equals_llama_cpp_with_it_off(engine_lib, cube_file, checkpoints, tmp_path, prompt_tokens, qtype):
    """repack=False keeps every weight in ggml's plain layout, as llama.cpp with use_extra_bufts
    off; by default the four projections of every layer are repacked, hypercube file or not."""
    path = cube_file(qtype)
    ref = llama_logits_no_repack(path, prompt_tokens)
    with _model(path, repack=False) as m:
        got, _ = m.eval(prompt_tokens)
        assert m.n_repacked == 0
    assert np.abs(got - ref).max() / ref.std() < 2e-3
    for f, experts in ((path, 2 * 2 if qtype == "q4_0" else 0), (tmp_path / "plain.gguf", 0)):
        if not f.exists():
            convert(checkpoints["small"][0], f, qtype, progress=False, log=lambda m: None)
        with _model(f) as m:
            # 2 layers x 4 projections, and in a Q4_0 hypercube file each layer's 2 expert copies
            # that mul_mat_id reads (this CPU has the kernels)
            assert m.n_repacked == 2 * 4 + experts


@pytest.mark.parametrize("qtype", ["f32", "q4_k", "tq2_0"])
def test_f16_kv_cache_equals_llama_cpp_with_its_f16_cache(engine_lib, cube_file, prompt_tokens, qtype):
    """The engine's default KV cache is f16, as llama.cpp's: with both in f16 the same bound holds
    (the f16 rounding of K and V alone moves these logits by about 5e-3 x std)."""
    path = cube_file(qtype)
    ref = llama_logits(path, prompt_tokens, kv_f32=False)
    with _model(path, kv_type="f16") as m:
        got, _ = m.eval(prompt_tokens)
    assert np.abs(got - ref).max() / ref.std() < 2e-3


def test_generation_reuses_one_graph(engine_lib, cube_file, prompt_tokens):
    """One graph for the prompt, one for every single-token step after it (KV length padded to
    256 covers this model's whole context), and the steps equal the batch."""
    with _model(cube_file("f32")) as m:
        whole, _ = m.eval(prompt_tokens)
        m.reset()
        builds = m.n_graph_builds
        m.eval(prompt_tokens[:5])
        steps = [m.eval([t])[0] for t in prompt_tokens[5:]]
        assert m.n_graph_builds - builds == 2
        m.eval([1], 1)  # another path: another graph
        assert m.n_graph_builds - builds == 3
        with pytest.raises(InputError, match="KV cache type 'q4_0'; expected f16 or f32"):
            _model(cube_file("f32"), kv_type="q4_0")
    assert np.abs(np.concatenate(steps) - whole[5:]).max() / whole.std() < 1e-3


@pytest.mark.parametrize("qtype", ["f32", "f16"])
@pytest.mark.parametrize("radius", [0, 1])
def test_routed_mode_equals_torch_reference(engine_lib, cube_file, prompt_tokens, qtype, radius):
    path = cube_file(qtype)
    info = read_hypercube(read_gguf(path), path)
    ref, ref_vertices = routed_forward(model_from_gguf(path), info, prompt_tokens, radius)
    with _model(path, kv_type="f32") as m:  # torch keeps K and V in f32
        got, vertices = m.eval(prompt_tokens, radius, want_vertices=True)
    assert np.array_equal(vertices, ref_vertices)  # the same groups were selected for every token
    # ggml vs torch arithmetic on the same weights (ggml's GELU is an fp16 table; f16 weights
    # take fp16-rounded activations): 0.006 is the f32 bound of the converter tests, 0.02 the f16 one
    tol = 0.006 if qtype == "f32" else 0.02
    assert np.abs(got - ref).max() / ref.std() < tol
    dense, _ = routed_forward(model_from_gguf(path), info, prompt_tokens, 2)
    assert np.abs(ref - dense).max() / ref.std() > 10 * tol  # routing really changed the output


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """1 x 256 with n_ff 1024 (d = 2: groups of 256 fill every block size)."""
    from gpt2cube.synth import make_random_gpt2

    return make_random_gpt2(tmp_path_factory.mktemp("one") / "m", n_layer=1, n_embd=256, n_head=4, init_std=0.1,
                            seed=12)[0]


# every FFN type the converter writes, alone and in the mixes a recipe makes (up != down)
FFN_PAIRS = [(t, t) for t in TYPES] + [("q4_k", "tq2_0"), ("tq1_0", "q6_k"), ("q8_0", "q4_0"), ("bf16", "q4_k"),
                                       ("q6_k", "f16")]


@pytest.mark.parametrize("repack", [False, True])
def test_expert_path_at_full_radius_equals_dense_for_every_ffn_type(engine_lib, one_layer, calib_file, tmp_path,
                                                                    prompt_tokens, repack):
    """The expert path (mul_mat_id over the 4 groups, the group outputs summed) computes what the
    dense FFN computes, for every type of ffn_up and ffn_down. Only float summation order differs:
    ggml's vec_dot keeps 8 lanes over the whole row and adds them once, where the expert path adds
    each group's horizontal sum. Nothing after this FFN quantizes activations here (one layer;
    attention, embeddings and head f32), so that difference stays at float rounding: measured
    ~1e-6 x std for every pair with a quantized weight (1.8e-5 with ggml's repacked Q4_K dense
    kernels beside plain experts), bound 1e-4; 1.0-4.2e-4 for f32 / f16 / bf16 up and down both
    (their dense mat-muls take tinyBLAS's float kernels, other sums again), bound 1e-3. A wrong
    group, layout or bias gives errors of order 1."""
    first = None
    for up, down in FFN_PAIRS:
        path = tmp_path / f"{up}-{down}.gguf"
        cube = HypercubeOptions(2, calib_file, 2048) if first is None else HypercubeOptions(0, None, source=first)
        convert(one_layer, path, Recipe("f32", "f32", [("blk.*.ffn_up.weight", up), ("blk.*.ffn_down.weight", down)]),
                progress=False, log=lambda m: None, hypercube=cube)
        first = first or path
        with _model(path, repack=repack) as m:
            dense, _ = m.eval(prompt_tokens)
            m.reset()
            experts, _ = m.eval(prompt_tokens, 2, experts=True)
            m.reset()
            half, _ = m.eval(prompt_tokens, 0, experts=True)
        floats = {up, down} <= {"f32", "f16", "bf16"}
        assert np.abs(experts - dense).max() / dense.std() < (1e-3 if floats else 1e-4), (up, down)
        assert np.abs(half - dense).max() / dense.std() > 1e-2, (up, down)  # routing at radius 0 is not dense


@pytest.mark.parametrize("qtype,embed,repack", [("q4_k", None, False), ("tq2_0", None, False), ("q4_0", None, True),
                                                ("q4_k", None, True), ("tq2_0", "q6_k", False), ("q6_k", "q8_0", False)])
def test_expert_path_at_full_radius_equals_dense(engine_lib, checkpoints, cube_file, tmp_path, prompt_tokens, qtype,
                                                 embed, repack):
    """Whole models, every weight quantized. The float-order difference of the expert path (above)
    then meets the next quantized mat-mul, which rounds its input to q8_0 / q8_K: once in a while
    an input sits on a rounding boundary and moves by one step, and the logits of that position
    move by up to ~0.05 x std (measured 0.054 with tq2_0 experts and q6_k embeddings, 0.050 with
    q6_k experts and q8_0 embeddings, 0 on other positions; the same happens between ggml's
    repacked and plain kernels, and for Q4_K between one batch and token by token). So the bound
    here is 0.1 with nearly every position's top token the same; the arithmetic itself is held to
    1e-4 by the test above."""
    path = cube_file(qtype) if embed is None else tmp_path / f"{qtype}-{embed}.gguf"
    if embed is not None:
        convert(checkpoints["small"][0], path, Recipe(qtype, embed), progress=False, log=lambda m: None,
                hypercube=HypercubeOptions(2, None, source=cube_file("f32")))
    with _model(path, repack=repack) as m:
        dense, _ = m.eval(prompt_tokens)
        m.reset()
        experts, vertices = m.eval(prompt_tokens, 2, experts=True, want_vertices=True)
    assert vertices.shape == (2, len(prompt_tokens)) and vertices.min() >= 0 and vertices.max() < 4
    assert np.abs(experts - dense).max() / dense.std() < 0.1
    assert (experts.argmax(1) == dense.argmax(1)).mean() > 0.95


def test_kv_cache_continues_exactly(engine_lib, cube_file, prompt_tokens):
    with _model(cube_file("f32")) as m:
        whole, _ = m.eval(prompt_tokens, 1)
        m.reset()
        first, _ = m.eval(prompt_tokens[:10], 1)
        rest = [m.eval([t], 1)[0] for t in prompt_tokens[10:]]
        assert m.n_past == len(prompt_tokens)
    steps = np.concatenate([first] + rest)
    assert np.abs(steps - whole).max() / whole.std() < 1e-3  # batch vs one-by-one: f32 rounding only
    with _model(cube_file("f32")) as m:
        last, _ = m.eval(prompt_tokens, 1, all_logits=False)  # the head on the last position only
    assert last.shape == (1, whole.shape[1]) and np.abs(last[0] - whole[-1]).max() / whole.std() < 1e-5


def test_engine_input_errors(engine_lib, cube_file, checkpoints, tmp_path):
    path = cube_file("f32")
    with _model(path, n_ctx=16) as m:
        with pytest.raises(InputError, match="token 60000 .* outside the vocabulary of 50257"):
            m.eval([1, 60000])
        with pytest.raises(InputError, match="0 cached \\+ 20 new tokens exceed the context of 16"):
            m.eval(list(range(20)))
    with pytest.raises(InputError, match="context 4096 exceeds the model's 256 positions"):
        _model(path, n_ctx=4096)
    src, _ = checkpoints["small"]
    plain = tmp_path / "plain.gguf"
    convert(src, plain, "f32", progress=False, log=lambda m: None)
    with _model(plain) as m:
        assert m.dim == 0
        with pytest.raises(InputError, match="has no hypercube metadata, so it cannot be routed"):
            m.eval([1, 2], 0)
        m.eval([1, 2])  # dense works on any GPT-2 file


U32, F32, ARR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.ARRAY


@pytest.mark.parametrize("change, message", [
    ({"hypercube.dim": (12, U32, None)}, "hypercube.dim = 12; expected 1..10"),
    ({"hypercube.dim": (3, U32, None)}, "hypercube.vertex_count = 4; expected 2^3 = 8"),
    ({"hypercube.group_size": (100, U32, None)}, "hypercube.group_size = 100; expected n_ff / 2^d = 256"),
    ({"hypercube.routing_table": ([1, 2, 0, 3, 3, 0, 2, 2], ARR, U32)}, "hypercube.routing_table[3][1] = 2; expected 1"),
    ({"hypercube.router.weight": ([0.5] * 10, ARR, F32)}, "hypercube.router.weight has 10 values; expected 1024"),
    ({"hypercube.router.bias": ([0.0, float("nan"), 0.0, 0.0], ARR, F32)}, "hypercube.router.bias holds NaN"),
    ({"hypercube.router.bias": ([1, 2, 3, 4], ARR, U32)}, "hypercube.router.bias is not an array of f32"),
    ({"hypercube.layer_count": None}, "metadata key hypercube.layer_count is missing"),
    ({"hypercube.version": (3, U32, None)}, "hypercube.version = 3; this engine reads versions 1..2"),
    ({"hypercube.compensation": ([0.0] * 10, ARR, F32)}, "hypercube.compensation has 10 values; expected 4096"),
    ({"hypercube.compensation": ([float("inf")] * 4096, ARR, F32)}, "hypercube.compensation holds NaN or infinity"),
])
def test_corrupt_hypercube_metadata_is_a_clear_error(engine_lib, cube_file, tmp_path, change, message):
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(cube_file("f32"), bad, change)
    with pytest.raises(InputError) as e:
        _model(bad)
    assert message in str(e.value) and str(bad) in str(e.value)


def test_engine_refuses_broken_files(engine_lib, cube_file, tmp_path):
    good = cube_file("f32").read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(good[: len(good) // 2])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    for p in (trunc, junk, tmp_path / "missing.gguf"):
        with pytest.raises(InputError, match=str(p)):
            _model(p)


def test_route_and_routed_perplexity_commands(engine_lib, cube_file, calib_file):
    path = cube_file("q8_0")
    r = CliRunner().invoke(main, ["route", str(path), "--prompt", "Once upon a time", "--radius", "1", "-n", "6", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["tokens"]) == 6 and len(out["vertices"]) == 6 and all(len(v) == 2 for v in out["vertices"])
    text = calib_file
    ppl = {}
    for extra in ([], ["--radius", "0"]):
        r = CliRunner().invoke(main, ["eval", "perplexity", str(path), "--text", str(text), "--ctx", "64",
                                      "--max-windows", "3", "--engine", "routed", "--quiet", "--json", *extra])
        assert r.exit_code == 0, r.output
        ppl[len(extra)] = json.loads(r.output)[0]
    r = CliRunner().invoke(main, ["eval", "perplexity", str(path), "--text", str(text), "--ctx", "64",
                                  "--max-windows", "3", "--quiet", "--json"])
    stock = json.loads(r.output)[0]
    assert ppl[0]["engine"] == "routed engine, dense" and ppl[2]["engine"] == "routed engine, radius 0 of 2"
    # dense engine vs stock llama.cpp as `eval perplexity` runs it (f16 KV caches on both sides;
    # batch sizes differ): this random model's PPL (~1.6e5) magnifies any logit difference
    assert abs(ppl[0]["ppl"] / stock["ppl"] - 1) < 1e-2
    assert ppl[2]["ppl"] != ppl[0]["ppl"]
    r = CliRunner().invoke(main, ["eval", "perplexity", str(path), "--text", str(text), "--radius", "1"])
    assert r.exit_code == 2 and "--radius needs --engine routed" in r.output


def test_missing_engine_is_reported_and_the_rest_works(cube_file, monkeypatch):
    import gpt2cube.engine.binding as binding
    from gpt2cube.engine.build import EngineUnavailable

    def unavailable(**kw):
        raise EngineUnavailable("no C++ compiler (c++, g++ or clang++) and no cmake on PATH; install one to use the routed engine")

    monkeypatch.setattr(binding, "_LIB", None)
    monkeypatch.setattr(binding, "library_path", unavailable)
    path = cube_file("f32")
    r = CliRunner().invoke(main, ["route", str(path), "--prompt", "Hello", "-n", "2"])
    assert r.exit_code == 4 and "no C++ compiler" in r.output
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0 and "hypercube: Q_2" in r.output


def test_fuzzed_metadata_never_crashes(engine_lib, cube_file, tmp_path):
    """Random byte flips in the header (metadata and tensor table) of a hypercube file: the
    engine loads it or raises a clear error; a crash would take the test process down."""
    path = cube_file("f32")
    good = bytearray(path.read_bytes())
    # the fields the engine reads: the gpt2.* keys near the start, then everything from the
    # hypercube keys to the end of the tensor table (the tokenizer arrays between are skipped)
    regions = [(8, good.index(b"tokenizer.ggml.model")), (good.index(b"hypercube.dim"), GGUFReader(path).data_offset)]
    rng = np.random.default_rng(7)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(60):
        bad = bytearray(good)
        for lo, hi in regions:
            for pos in rng.integers(lo, hi, size=2):
                bad[pos] = int(rng.integers(0, 256))
        p = tmp_path / f"fuzz{i}.gguf"
        p.write_bytes(bytes(bad))
        try:
            with _model(p, n_ctx=32) as m:
                m.eval([1, 2, 3], 1)
            outcomes["loaded"] += 1
        except InputError as e:
            assert str(p) in str(e) or "token" in str(e) or "context" in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 10  # the flips did hit checked fields


@pytest.fixture(scope="module")
def sweep_model(tmp_path_factory):
    """3 layers x 64 wide with n_ff 1024: every dimension 1..10 the converter accepts for f32."""
    from gpt2cube.synth import make_random_gpt2

    return make_random_gpt2(tmp_path_factory.mktemp("sweep") / "m", n_layer=3, n_embd=64, n_head=2, n_inner=1024,
                            n_positions=128, init_std=0.1, seed=11)[0]


@pytest.mark.parametrize("dim", range(1, 11))
def test_every_dimension_and_radius_runs_and_matches_the_reference(engine_lib, sweep_model, calib_file, tmp_path,
                                                                   prompt_tokens, dim):
    """Each (d, r) either runs or is refused with a message; here all are valid and must run, the
    selected groups equal the torch reference's and the logits agree with it. Large balls (d = 10,
    r = 6: 848 of 1024 groups) once needed one graph node per group and aborted the process."""
    path = tmp_path / f"cube{dim}.gguf"
    convert(sweep_model, path, "f32", progress=False, log=lambda m: None, hypercube=HypercubeOptions(dim, calib_file, 2048))
    info = read_hypercube(read_gguf(path), path)
    ref_model = model_from_gguf(path)
    tokens = prompt_tokens[:40]
    with _model(path, n_ctx=64) as m:
        for radius in range(dim + 1):
            m.reset()
            got, vertices = m.eval(tokens, radius, want_vertices=True)
            if radius < dim:
                # with up to 10 hyperplanes per layer a margin within rounding of 0 can fall either
                # way (ggml vs torch sums) and then shifts later layers' inputs slightly: nearly all
                # routing decisions must agree, and the FFN arithmetic is compared on the engine's own
                _, ref_vertices = routed_forward(ref_model, info, tokens, radius)
                assert (vertices == ref_vertices).mean() > 0.97, (dim, radius)
            ref, _ = routed_forward(ref_model, info, tokens, radius, vertices if radius < dim else None)
            # f32 weights: ggml vs torch summation order and ggml's fp16 GELU table (0.006, as above)
            assert np.abs(got - ref).max() / ref.std() < 6e-3, (dim, radius)


def test_use_after_close_is_a_python_error(engine_lib, cube_file):
    from gpt2cube.engine.binding import EngineClosed

    m = _model(cube_file("f32"))
    m.close()
    m.close()  # twice is fine
    for call in (lambda: m.eval([1, 2]), m.reset, lambda: m.n_past):
        with pytest.raises(EngineClosed, match="was closed"):
            call()
