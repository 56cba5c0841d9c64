"""Importance matrices in the files llama.cpp's `llama-imatrix` writes and `llama-quantize --imatrix`
reads (vendored llama.cpp, tools/imatrix and common/imatrix-loader).

GGUF format (the default of llama-imatrix today): `general.type = "imatrix"`, `imatrix.datasets`
(string array), `imatrix.chunk_count`, `imatrix.chunk_size` (u32), and per weight tensor NAME two
F32 tensors: `NAME.in_sum2` (ne0 = the weight's input columns, ne1 = experts, 1 here), the sum over
the calibration tokens of each input column's squared activation, and `NAME.counts` (ne = [1,
experts]), how many tokens were summed. The importance llama-quantize uses is in_sum2 / counts.

Legacy `.dat` format (`--output-format dat`): int32 n_entries; per entry int32 name length, the name,
int32 ncall, int32 nval, float32[nval] holding mean * ncall; then optionally int32 chunk count and
int32 length + the dataset file name. The importance is values / ncall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_with
from ..errors import GGUFFormatError, InputError

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # tensor name -> (n_columns,) float64 sum of squared inputs
    counts: dict[str, int]  # tensor name -> tokens summed
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None  # where it was read from (for messages)

    def importance(self, name: str) -> np.ndarray:
        """The per-column mean of squared inputs (what llama-quantize hands its quantizers)."""
        return (self.sums[name] / max(1, self.counts[name])).astype(np.float32)

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "the importance matrix"

    def checked(self, name: str, n_columns: int) -> np.ndarray:
        """The importance of tensor `name` with `n_columns` input columns, or one line saying why not."""
        if name not in self.sums:
            raise InputError(f"{self.where}: no entry for tensor {name}; expected one per linear weight of this model "
                             f"(it holds {len(self.sums)} entries, e.g. {next(iter(sorted(self.sums)), 'none')}: "
                             "was it made for another model?)")
        imp = self.importance(name)
        if imp.shape != (n_columns,):
            raise InputError(f"{self.where}: tensor {name} has {imp.size} columns of importance; the model's "
                             f"{name} has {n_columns} input columns (was it made for another model?)")
        if self.counts[name] <= 0:
            raise InputError(f"{self.where}: tensor {name} was collected over {self.counts[name]} tokens; expected > 0")
        bad = ~np.isfinite(imp)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise InputError(f"{self.where}: tensor {name} column {j} has importance {imp[j]}; expected finite values")
        low = imp <= 0
        if low.any():
            j = int(np.flatnonzero(low)[0])
            raise InputError(f"{self.where}: tensor {name} column {j} has importance {imp[j]:g} "
                             f"({int(low.sum())} of {imp.size} columns <= 0); expected positive means of squared "
                             "activations (collect over more calibration text)")
        return imp

    def write(self, out: Path) -> Path:
        """The GGUF format llama-imatrix writes (a `.dat` name gets the legacy format)."""
        return write_with(out, self._write_dat if out.suffix == ".dat" else self._write_gguf)

    def _write_gguf(self, tmp: Path) -> None:
        w = _writer(tmp)
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", list(self.datasets) or [""])
        w.add_uint32("imatrix.chunk_count", int(self.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(self.chunk_size))
        for name in sorted(self.sums):
            w.add_tensor(name + SUM_SUFFIX, self.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(name + COUNT_SUFFIX, np.array([[float(self.counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def _write_dat(self, tmp: Path) -> None:
        chunk = max(1, self.chunk_size)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<i", len(self.sums)))
            for name in sorted(self.sums):
                ncall = max(1, -(-self.counts[name] // chunk))
                b = name.encode()
                f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, self.sums[name].size))
                f.write((self.sums[name] / max(1, self.counts[name]) * ncall).astype("<f4").tobytes())
            ds = (self.datasets[-1] if self.datasets else "").encode()
            f.write(struct.pack("<i", int(self.chunk_count)) + struct.pack("<i", len(ds)) + ds)


def _writer(tmp: Path):
    """A GGUFWriter with no `general.architecture` (llama-imatrix's files have none)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp), arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)
    return w


def read_imatrix(path: Path) -> Imatrix:
    """An importance matrix from a file llama-imatrix (or `gpt2cube imatrix`) wrote, either format."""
    if not path.is_file():
        raise InputError(f"{path}: no such importance matrix file; expected one written by `gpt2cube imatrix` "
                         "or llama-imatrix")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise GGUFFormatError(f"{path}: not a readable GGUF importance matrix ({type(e).__name__}: {e})") from None

    def kv(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if kv("general.type") != "imatrix":
        raise GGUFFormatError(f"{path}: general.type is {kv('general.type')!r}; expected 'imatrix' "
                              "(a model file, not an importance matrix?)")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name[: -len(SUM_SUFFIX)]] = np.asarray(t.data, dtype=np.float64)
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name[: -len(COUNT_SUFFIX)]] = np.asarray(t.data, dtype=np.float64)
    out_sums, out_counts = {}, {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise GGUFFormatError(f"{path}: tensor {name} has {'no ' + SUM_SUFFIX if name not in sums else 'no ' + COUNT_SUFFIX}"
                                  "; expected both")
        c = counts[name].reshape(-1)
        if c.size != 1:  # one matrix per expert: GPT-2 has no experts
            raise InputError(f"{path}: tensor {name} has {c.size} expert matrices; expected 1 (a dense GPT-2)")
        out_sums[name], out_counts[name] = sums[name].reshape(-1), int(round(float(c[0])))
    ds = kv("imatrix.datasets")
    return Imatrix(out_sums, out_counts, list(ds) if isinstance(ds, list) else ([ds] if ds else []),
                   int(kv("imatrix.chunk_count") or 0), int(kv("imatrix.chunk_size") or 0), path)


def _read_dat(path: Path) -> Imatrix:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise GGUFFormatError(f"{path}: ends at byte {len(raw)} inside an entry; expected a legacy imatrix .dat "
                                  "or a GGUF importance matrix")
        v = struct.unpack_from(fmt, raw, pos)
        pos += size
        return v

    (n,) = take("<i")
    if not 0 < n < 1 << 20:
        raise GGUFFormatError(f"{path}: {n} entries; expected a legacy imatrix .dat (or a GGUF importance matrix)")
    sums, counts = {}, {}
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise GGUFFormatError(f"{path}: a tensor name of {ln} bytes; expected a legacy imatrix .dat")
        name = raw[pos : pos + ln].decode("utf-8", "replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 0:
            raise GGUFFormatError(f"{path}: tensor {name} has {nval} values; expected >= 0")
        vals = np.asarray(take(f"<{nval}f"), dtype=np.float64)
        # stored: mean * ncall. Keep (sum, count) with count = ncall, so importance = vals / ncall.
        sums[name], counts[name] = vals, max(ncall, 0)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (ln,) = take("<i")
            datasets = [raw[pos : pos + ln].decode("utf-8", "replace")] if ln > 0 else []
    return Imatrix(sums, counts, datasets, chunk_count, 0, path)
