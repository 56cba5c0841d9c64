"""The converter's GGUF writer packs metadata arrays in one call; its bytes must be gguf-py's."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFValueType, GGUFWriter

from gpt2cube.converter.writer import ArrayPackingWriter

V = GGUFValueType
CASES = [
    (["Ġthe", "é", "", "<|endoftext|>", "日本"], V.ARRAY, None),
    ([b"\xff\xfe", bytearray(b"ab")], V.ARRAY, None),
    ([1, -2, 3], V.ARRAY, None),
    ([0, 7, 4294967295], V.ARRAY, V.UINT32),
    ([1.5, -0.0, 3.4e38, float("inf")], V.ARRAY, None),
    ([np.float32(0.1), np.float32(2.0)], V.ARRAY, V.FLOAT32),
    ([True, False, True], V.ARRAY, None),
    ([1, 2], V.ARRAY, V.INT64),
    ([0.25], V.ARRAY, V.FLOAT64),
    ([[1, 2], [3]], V.ARRAY, None),  # arrays of arrays: gguf-py's own packing
    (b"\x00\x01", V.ARRAY, None),
    ("a string", V.STRING, None),
    (7, V.UINT32, None),
]


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
@pytest.mark.parametrize("val,vtype,sub", CASES)
def test_same_bytes_as_gguf_py(val, vtype, sub, endian):
    ours = ArrayPackingWriter(path=None, arch="gpt2", endianess=endian)
    theirs = GGUFWriter(path=None, arch="gpt2", endianess=endian)
    for add_vtype in (True, False):
        assert ours._pack_val(val, vtype, add_vtype, sub) == theirs._pack_val(val, vtype, add_vtype, sub)


@pytest.mark.parametrize("val", [[1, "a"], [1.0, 2], np.arange(3)])
def test_bad_arrays_raise_as_gguf_py_does(val):
    with pytest.raises(ValueError) as theirs:
        GGUFWriter(path=None, arch="gpt2")._pack_val(val, V.ARRAY, True)
    with pytest.raises(ValueError) as ours:
        ArrayPackingWriter(path=None, arch="gpt2")._pack_val(val, V.ARRAY, True)
    assert str(ours.value) == str(theirs.value)
