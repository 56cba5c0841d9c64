"""The direct header parser against gguf-py's reader: every scalar of every value type, the
tensor table, and refusals of damaged files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from gpt2cube.errors import GGUFFormatError
from gpt2cube.gguf_file import field_value, read_header


@pytest.fixture
def gguf_path(tmp_path):
    p = tmp_path / "t.gguf"
    w = GGUFWriter(p, arch="gpt2")
    w.add_uint32("gpt2.context_length", 77)
    w.add_key_value("a.u8", 200, GGUFValueType.UINT8)
    w.add_key_value("a.i8", -5, GGUFValueType.INT8)
    w.add_key_value("a.u16", 60000, GGUFValueType.UINT16)
    w.add_key_value("a.i16", -30000, GGUFValueType.INT16)
    w.add_key_value("a.i32", -7, GGUFValueType.INT32)
    w.add_key_value("a.f32", 0.1, GGUFValueType.FLOAT32)
    w.add_key_value("a.bool", True, GGUFValueType.BOOL)
    w.add_key_value("a.u64", 2**40, GGUFValueType.UINT64)
    w.add_key_value("a.i64", -(2**40), GGUFValueType.INT64)
    w.add_key_value("a.f64", 1 / 3, GGUFValueType.FLOAT64)
    w.add_key_value("a.str", "héllo", GGUFValueType.STRING)
    w.add_key_value("b.strings", ["x", "yy", "zzz"] * 1000, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value("b.floats", [1.5] * 33, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value("c.after", 9, GGUFValueType.UINT32)  # read correctly only if the arrays were skipped right
    w.add_tensor("w", np.zeros((3, 64), np.float32))
    w.add_tensor("q", np.zeros((2, 34), np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_header_equals_gguf_py(gguf_path):
    h = read_header(gguf_path)
    r = GGUFReader(gguf_path)
    want = {k: field_value(r, k) for k, f in r.fields.items()
            if not k.startswith("GGUF.") and f.types[0] != GGUFValueType.ARRAY}
    assert h.kv == want and h.kv["c.after"] == 9 and h.kv["a.str"] == "héllo"
    assert [(n, s) for n, s, _ in h.tensors] == [(t.name, tuple(int(d) for d in t.shape)) for t in r.tensors]
    assert h.tensor_bytes_and_elements() == (sum(int(t.n_bytes) for t in r.tensors), 3 * 64 + 2 * 32)


def test_damaged_headers_are_refused(gguf_path, tmp_path):
    good = gguf_path.read_bytes()
    for name, data in (("magic", b"GGUX" + good[4:]), ("cut", good[:200]), ("empty", b"")):
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(GGUFFormatError, match=f"{name}.gguf: not a readable GGUF file"):
            read_header(p)
