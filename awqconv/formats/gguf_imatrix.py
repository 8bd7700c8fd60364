"""llama.cpp importance-matrix (imatrix) files from ``QuantizedModel.importance``, and the
per-tensor weights llama.cpp's quantizer takes.

The file is what ``llama-imatrix`` writes by default and ``llama-quantize --imatrix`` reads
(llama.cpp as bundled in llama-cpp-python 0.3.36: tools/imatrix ``save_imatrix``,
common/imatrix-loader.cpp): a GGUF with no architecture, ``general.type = "imatrix"``,
``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and
per llama.cpp weight two F32 tensors, sorted by name: ``<weight>.in_sum2`` (ggml ne ``[n_in, n_mat]``:
the sums of ``x_j ** 2``) and ``<weight>.counts`` (ne ``[1, n_mat]``: tokens summed). ``n_mat`` is 1
for a plain linear and the expert count for stacked experts (one row and one count per expert).
The loader also reads the older ``.dat`` layout; we write only the GGUF one.

The file is named ``<model>.imatrix``, not ``*.gguf``: a second .gguf in an artifact would be
taken for a model by awqconv's readers and by tools that list a repository's GGUF files; the
loader recognises the content, not the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, Keys

from ..errors import CorruptFileError, FormatConstraintError
from ..model import QuantizedModel
from .gguf_tensors import gguf_slot

SUFFIX = ".imatrix"
IN_SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class ImatrixEntry:
    """One llama.cpp weight's statistics."""

    sums: np.ndarray  # float32 [n_mat, n_in]
    counts: np.ndarray  # float32 [n_mat]

    def weights(self) -> np.ndarray:
        """What llama-quantize hands the quantizer: ``sums / count`` per matrix, flattened; a matrix
        no token reached gets ones (llama-quantize's rule, so it is quantized unweighted)."""
        out = np.ones_like(self.sums)
        seen = self.counts > 0
        out[seen] = self.sums[seen] / self.counts[seen, None]
        return out.reshape(-1)


def imatrix_entries(qm: QuantizedModel) -> dict[str, ImatrixEntry]:
    """llama.cpp weight name -> entry, for every quantized linear ``qm.importance`` covers (experts
    stacked in expert order, as the weights are); {} when the model carries no statistics."""
    imp = qm.importance
    if imp is None:
        return {}
    arch = qm.architecture
    slots: dict[str, dict[int | None, str]] = {}
    for name in qm.linears:
        slot = gguf_slot(f"{name}.weight", arch)
        if slot is not None and name in imp.sums:
            slots.setdefault(slot[0], {})[slot[1]] = name
    out: dict[str, ImatrixEntry] = {}
    for gname, by_expert in sorted(slots.items()):
        order = [None] if None in by_expert else list(range(len(by_expert)))
        if any(e not in by_expert for e in order):
            continue  # an expert without statistics: llama.cpp then quantizes the tensor unweighted
        names = [by_expert[e] for e in order]
        sums = np.stack([imp.sums[n].float().numpy() for n in names]).astype(np.float32)
        counts = np.array([imp.counts[n] for n in names], dtype=np.float32)
        if not np.isfinite(sums).all():
            raise FormatConstraintError(f"gguf: the importance matrix of {gname} holds NaN/inf; llama.cpp "
                                        "refuses it; re-quantize (the calibration activations overflowed)")
        out[gname] = ImatrixEntry(sums, counts)
    return out


class _NoArchWriter(GGUFWriter):
    def add_architecture(self) -> None:  # imatrix files name no architecture (llama-imatrix writes none)
        pass


def write_imatrix(path: Path, entries: dict[str, ImatrixEntry], datasets: list[str], chunk_count: int,
                  chunk_size: int) -> Path:
    """Write ``entries`` as llama.cpp's GGUF imatrix file at ``path``."""
    w = _NoArchWriter(str(path), arch="")
    w.add_type("imatrix")
    # llama-quantize refuses a file without this key, and gguf-py writes no empty array
    w.add_array(Keys.IMatrix.DATASETS, list(datasets) or ["unrecorded"])
    w.add_uint32(Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(entries):
        e = entries[name]
        w.add_tensor(name + IN_SUM2, np.ascontiguousarray(e.sums, dtype=np.float32))
        w.add_tensor(name + COUNTS, np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


def read_imatrix(path: Path) -> tuple[dict[str, ImatrixEntry], dict[str, object]]:
    """Entries and metadata of a GGUF imatrix file (ours or llama-imatrix's)."""
    try:
        r = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise CorruptFileError(f"{path}: not a GGUF imatrix file ({e})") from None
    meta: dict[str, object] = {}
    for key in (Keys.General.TYPE, Keys.IMatrix.CHUNK_COUNT, Keys.IMatrix.CHUNK_SIZE, Keys.IMatrix.DATASETS):
        f = r.fields.get(key)
        if f is not None:
            meta[key] = f.contents()
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for tname, t in tensors.items():
        if not tname.endswith(IN_SUM2):
            continue
        base = tname[: -len(IN_SUM2)]
        c = tensors.get(base + COUNTS)
        if c is None:
            raise CorruptFileError(f"{path}: {tname} has no {base + COUNTS}")
        counts = np.array(c.data, dtype=np.float32).reshape(-1)
        out[base] = ImatrixEntry(np.array(t.data, dtype=np.float32).reshape(len(counts), -1), counts)
    return out, meta


@dataclass
class KquantImatrix:
    path: Path  # the file written
    weights: dict[str, np.ndarray]  # what llama.cpp's quantizer takes, per weight
    kv: dict[str, str | int]  # the provenance keys llama-quantize --imatrix writes into the model


def save_for_kquant(qm: QuantizedModel, out_dir: Path, model_name: str) -> KquantImatrix | None:
    """Write ``qm``'s importance matrix beside a K-quant and return what the quantizer needs; None
    when ``qm`` carries no statistics (RTN, or read back from an artifact)."""
    entries = imatrix_entries(qm)
    if not entries:
        return None
    imp = qm.importance
    path = write_imatrix(Path(out_dir) / f"{model_name}{SUFFIX}", entries, imp.datasets, imp.chunk_count,
                         imp.chunk_size)
    kv: dict[str, str | int] = {"quantize.imatrix.file": path.name, "quantize.imatrix.entries_count": len(entries),
                                "quantize.imatrix.chunks_count": imp.chunk_count}
    if imp.datasets:
        kv["quantize.imatrix.dataset"] = imp.datasets[0]
    return KquantImatrix(path, {n: e.weights() for n, e in entries.items()}, kv)
