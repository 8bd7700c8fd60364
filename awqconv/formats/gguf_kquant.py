"""K-quant GGUF variants (q4_k_m, q6_k, ...) through llama.cpp's own quantizer.

gguf-py has no K-quant encoder, so the AWQ-prescaled weights are first written as a float GGUF
(a temporary sibling file), then ``llama_model_quantize`` from llama-cpp-python turns it into the
requested type with llama.cpp's usual per-tensor mixture. Embeddings and output stay at Q8_0.
Rows that are not whole 256-blocks fall back inside llama.cpp (Q4_K -> Q5_0, Q6_K -> Q8_0 ...);
the fallbacks are read back from the result (the caller reports them with ``report_fallbacks``).
With an importance matrix (``weights``: llama.cpp weight name -> per-column weights, what
llama-quantize derives from an imatrix file) the call is what ``llama-quantize --imatrix`` makes:
``llama_model_quantize_params.imatrix`` is a C array of ``{name, data, size}`` ended by a null name
(llama.cpp since the C API replaced the C++ map pointer; llama-cpp-python 0.3.36 binds it), and the
imatrix provenance keys go into the file through ``kv_overrides``, as llama-quantize writes them.
This module imports nothing of ``gguf.py``, which imports it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from ..errors import FormatConstraintError
from .gguf_tensors import Variant, block_size

log = logging.getLogger(__name__)
T = GGMLQuantizationType

# the GGML type a K-quant file type asks of most linears (llama.cpp's per-tensor type choice)
_MAIN_TYPE = {
    "q2_k": T.Q2_K, "q3_k_m": T.Q3_K, "q4_k_s": T.Q4_K, "q4_k_m": T.Q4_K,
    "q5_k_s": T.Q5_K, "q5_k_m": T.Q5_K, "q6_k": T.Q6_K,
}


def llama_quantize(src: Path, dst: Path, file_type: int, n_threads: int = 0,
                   weights: dict[str, np.ndarray] | None = None, kv: dict[str, str | int] | None = None) -> None:
    """Run llama.cpp's quantizer on ``src`` (a float GGUF) into ``dst``; raise on failure.

    ``weights``: importance weights per llama.cpp tensor name (flattened ``[n_mat * n_in]``);
    ``kv``: metadata written into ``dst`` (str or int values)."""
    try:
        import llama_cpp
    except ImportError:
        raise FormatConstraintError(
            "K-quant GGUF needs llama-cpp-python (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
            "llama-cpp-python); or export gguf:q4_0 / gguf:q5_0 / gguf:q8_0"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = n_threads
    params.token_embedding_type = int(T.Q8_0)
    params.output_tensor_type = int(T.Q8_0)
    keep = []  # the C arrays must outlive the call
    if weights:
        keep.append(_imatrix_array(llama_cpp, weights))
        params.imatrix = keep[-1][0]
    if kv:
        keep.append(_kv_array(llama_cpp, kv))
        params.kv_overrides = keep[-1]
    # llama.cpp reports through llama-cpp-python's logger; keep its per-tensor chatter off stderr
    lc_log = logging.getLogger("llama-cpp-python")
    level = lc_log.level
    lc_log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        lc_log.setLevel(level)
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise FormatConstraintError(f"llama.cpp failed to quantize {src.name} (code {rc})")


def write_kquant(path: Path, v: Variant, write_float: Callable[[Path], Any],
                 weights: dict[str, np.ndarray] | None = None, kv: dict[str, str | int] | None = None) -> Any:
    """``write_float`` (a float GGUF of the prescaled weights) -> llama.cpp quantizer -> ``path``,
    with importance ``weights`` when given (see :func:`llama_quantize`).

    Returns the float writer's GGUFWriteResult with the final path, types and fallbacks.
    """
    tmp = path.with_name(f".{path.name}.float.tmp")
    try:
        result = write_float(tmp)
        llama_quantize(tmp, path, int(v.file_type), weights=weights, kv=kv)
    finally:
        tmp.unlink(missing_ok=True)
    result.path, result.variant = path, v.name
    counts: dict[str, int] = {}
    fallbacks = []
    want = _MAIN_TYPE[v.name]
    for t in GGUFReader(str(path)).tensors:
        tt = T(t.tensor_type)
        counts[tt.name] = counts.get(tt.name, 0) + 1
        ne0 = int(t.shape[0])
        kept = t.name in ("token_embd.weight", "output.weight") or ".ffn_gate_inp." in t.name  # never K-quants
        if len(t.shape) >= 2 and ne0 % block_size(want) and not kept:
            fallbacks.append(f"{t.name}: K-quant -> {tt.name} (row of {ne0} is not whole 256-blocks)")
    result.tensor_types = counts
    result.fallbacks = fallbacks
    return result


def report_fallbacks(variant: str, fallbacks: list[str]) -> None:
    """One warning with the count and an example; every tensor at debug level."""
    if not fallbacks:
        return
    log.warning("gguf:%s: %d tensor(s) written in another type because their rows are not whole "
                "blocks (e.g. %s); see GGUFWriteResult.fallbacks", variant, len(fallbacks), fallbacks[0])
    for f in fallbacks:
        log.debug("gguf:%s fallback: %s", variant, f)


def _imatrix_array(llama_cpp: Any, weights: dict[str, np.ndarray]) -> tuple:
    """``llama_model_imatrix_data[n + 1]`` (null-name terminated) and the buffers it points into."""
    arr = (llama_cpp.llama_model_imatrix_data * (len(weights) + 1))()
    bufs = []
    for i, (name, w) in enumerate(weights.items()):
        buf = np.ascontiguousarray(w, dtype=np.float32).reshape(-1)
        bufs.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    return arr, bufs


def _kv_array(llama_cpp: Any, kv: dict[str, str | int]) -> Any:
    """``llama_model_kv_override[n + 1]`` (empty-key terminated); strings cut to llama.cpp's 127 bytes."""
    arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for i, (key, val) in enumerate(kv.items()):
        arr[i].key = key.encode()[:127]
        if isinstance(val, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = val
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = str(val).encode()[:127]
    return arr
