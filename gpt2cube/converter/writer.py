"""gguf-py's GGUFWriter with metadata arrays packed in one call instead of one `struct.pack`
per element. GPT-2's tokenizer alone is 150k array elements (tokens, merges, token types) and a
hypercube file adds the routers, the permutation and the compensation table (L x D x 2^D x
n_embd floats); gguf-py packs each element separately, about a second of every conversion.
The bytes are gguf-py's exactly (tests/test_writer.py compares them); anything but a flat
array of one scalar or string type goes to gguf-py's own packing."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from gguf import GGUFEndian, GGUFValueType, GGUFWriter


class ArrayPackingWriter(GGUFWriter):
    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype != GGUFValueType.ARRAY or isinstance(val, (bytes, str)) or not isinstance(val, Sequence) or not val:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        if sub_type is None and not all(GGUFValueType.get_type(v) is ltype for v in val):
            return super()._pack_val(val, vtype, add_vtype, sub_type)  # gguf-py's error for mixed types
        order = "<" if self.endianess == GGUFEndian.LITTLE else ">"
        fmt = self._simple_value_packing.get(ltype)
        if fmt is not None:
            # gguf-py packs bools without the byte-order prefix (1 byte each either way)
            body = struct.pack(f"{'' if ltype == GGUFValueType.BOOL else order}{len(val)}{fmt}", *val)
        elif ltype == GGUFValueType.STRING:
            length = struct.Struct(f"{order}Q")
            encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            body = b"".join(length.pack(len(e)) + e for e in encoded)
        else:  # arrays of arrays
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack(f"{order}I", vtype) if add_vtype else b""
        return head + struct.pack(f"{order}IQ", ltype, len(val)) + body
