"""Reading GGUF files back: the exact ``q4_1-awq`` transplant to canonical, and file detection.

Only the transplant carries the canonical integers (Q4_1 blocks with ``d = s``, ``m = -z*s``);
``read`` recovers ``z = round(-m / d)``, undoes the Q/K row permutation, takes each MoE expert's
rows out of its stacked tensor and restores every dense tensor's dtype (Gemma's ``(1 + w)`` gains
from metadata: the tensors llama.cpp reads hold ``w + 1``), the HF config, the quant config and the
tokenizer assets stored by ``write``.
Other GGUF files are refused with a FormatConstraintError saying why they are not exact.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import QuantConfig
from ..errors import CorruptFileError, FormatConstraintError, InputError
from ..model import QuantizedModel
from ..packed import PackedLinear
from .gguf_arch import check_arch, tied_embeddings
from .gguf_tensors import (
    TRANSPLANT,
    from_q4_1_packed,
    gguf_name,
    gguf_slot,
    rope_heads,
    unpermute_rows,
)

T = GGMLQuantizationType
_SKIP_KEYS = re.compile(r"rotary_emb\.inv_freq$")

# GGUF metadata value types (the gguf_metadata_value_type ids of the GGUF spec): id -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / HF order (GGUF stores it reversed)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute file offset of the data
    nbytes: int


class GGUFFile:
    """A minimal GGUF v2/v3 parser: metadata into Python values, tensor data memory-mapped.

    gguf-py's GGUFReader builds a numpy view per metadata element (seconds for a 49k-token vocab);
    this walks the header with ``struct`` once and maps only the tensors that are asked for.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                raise CorruptFileError(f"{self.path} is not a GGUF file (bad magic); re-export it")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
            if version not in (2, 3):
                raise CorruptFileError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
            self._buf = f.read(min(self.path.stat().st_size - 24, 1 << 30))
        self._pos = 0
        try:
            self.fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self._string()
                self.fields[key] = self._value(self._u32())
            align = int(self.fields.get("general.alignment", 32))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                dims = [self._u64() for _ in range(self._u32())]
                infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(self._u32()), self._u64()))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{self.path}: truncated or corrupt GGUF header ({e}); re-export it") from None
        start = 24 + self._pos
        data = start + (-start) % align
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, t, off in infos:
            blk, bsize = GGML_QUANT_SIZES[t]
            n = int(np.prod(shape)) if shape else 1
            info = TensorInfo(name, shape, t, data + off, n // blk * bsize)
            if info.offset + info.nbytes > size:
                raise CorruptFileError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = info
        del self._buf

    def _take(self, n: int) -> bytes:
        b = self._buf[self._pos : self._pos + n]
        if len(b) != n:
            raise struct.error("unexpected end of header")
        self._pos += n
        return b

    def _u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def _u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def _string(self) -> str:
        return self._take(self._u64()).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            sub, n = self._u32(), self._u64()
            if sub in _SCALARS:
                fmt = _SCALARS[sub]
                size = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self._take(n * size)))
            return [self._value(sub) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def data(self, name: str) -> np.ndarray:
        """Raw tensor bytes, uint8 ``[rows, row_bytes]`` (1-D tensors: ``[1, bytes]``), memory-mapped."""
        info = self.tensors[name]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return mm.reshape(rows, -1)

    def array(self, name: str) -> np.ndarray:
        """A float tensor (F32/F16) in numpy shape order."""
        info = self.tensors[name]
        dt = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.int16}[info.ggml_type]
        return self.data(name).view(dt).reshape(info.shape)



def _gguf_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise InputError(f"{path} holds {len(files)} .gguf files; pass the file itself")
        return files[0]
    if not path.exists():
        raise InputError(f"{path} not found")
    return path


def detect(path: Path) -> bool:
    path = Path(path)
    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    for f in files:
        try:
            with open(f, "rb") as fh:
                if fh.read(4) == b"GGUF":
                    return True
        except OSError:
            continue
    return False


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def read(path: Path) -> QuantizedModel:
    """A ``q4_1-awq`` transplant back to the canonical model, bit for bit; other GGUFs are refused."""
    file = _gguf_file(path)
    reader = GGUFFile(file)
    variant = _field(reader, "awqconv.variant")
    if variant != TRANSPLANT:
        what = f"awqconv gguf:{variant}" if variant else "not written by awqconv"
        raise FormatConstraintError(
            f"{file.name} is {what}; only gguf:{TRANSPLANT} files hold the canonical integers exactly "
            "(other GGUF types re-quantize the weights), so it cannot be read back as canonical"
        )
    hf_config = json.loads(_field(reader, "awqconv.hf_config"))
    quant_config = QuantConfig.from_dict(json.loads(_field(reader, "awqconv.quant_config")))
    groups = json.loads(_field(reader, "awqconv.linear_groups"))
    scale_dtype = getattr(torch, _field(reader, "awqconv.scale_dtype", "float16"))
    dense_dtypes = json.loads(_field(reader, "awqconv.dense_dtypes"))
    assets = {k: base64.b64decode(s) for k, s in json.loads(_field(reader, "awqconv.assets", "{}")).items()}
    provenance = json.loads(_field(reader, "awqconv.provenance", "{}"))
    _, permute = check_arch(hf_config)
    arch = (hf_config.get("architectures") or ["?"])[0]
    n_head = int(hf_config["num_attention_heads"])
    n_kv = int(hf_config.get("num_key_value_heads") or n_head)
    offset_norms = json.loads(_field(reader, "awqconv.offset_norms", "{}"))
    tied = tied_embeddings(hf_config)

    tensors = reader.tensors
    linears: dict[str, PackedLinear] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        tname, expert = gguf_slot(f"{name}.weight", arch) or ("", None)
        t = tensors.get(tname)
        if t is None or t.ggml_type != T.Q4_1 or (expert is not None and (len(t.shape) != 3 or expert >= t.shape[0])):
            raise CorruptFileError(f"{file.name}: {name} is missing or not Q4_1; re-export gguf:{TRANSPLANT}")
        data = reader.data(t.name)
        if expert is not None:  # one expert's rows of the stacked [expert, out, in] tensor
            data = data[expert * t.shape[1] : (expert + 1) * t.shape[1]]
        qweight, z, s = from_q4_1_packed(data, g, name)
        n_rot = rope_heads(name, n_head, n_kv, arch) if permute else None
        bias = None
        tb = tensors.get(gguf_name(f"{name}.bias", arch))
        if tb is not None:
            bias = torch.from_numpy(np.array(reader.array(tb.name), dtype=np.float32))
        if n_rot:
            qweight, z, s = (unpermute_rows(x, n_rot) for x in (qweight, z, s))
            bias = None if bias is None else unpermute_rows(bias, n_rot)
        scales = s.to(scale_dtype)  # exact: to_q4_1 refused scales fp16 cannot hold
        p = PackedLinear(qweight, scales, z, qweight.shape[1] * 2, g, 4,
                         None if bias is None else bias.to(scales.dtype))
        p.validate(name)
        linears[name] = p
    for key, dt in dense_dtypes.items():
        t = tensors.get(gguf_name(key, arch) or "")
        if t is None:
            if key == "lm_head.weight" and tied:
                continue
            if _SKIP_KEYS.search(key):
                continue
            raise CorruptFileError(f"{file.name}: tensor for {key} is missing; re-export gguf:{TRANSPLANT}")
        if t.ggml_type not in (T.F32, T.F16, T.BF16):
            raise CorruptFileError(f"{file.name}: {t.name} is {t.ggml_type.name}, not a float type")
        if key in offset_norms:  # the file holds w + 1 for llama.cpp; the exact gains are in the metadata
            raw = bytearray(base64.b64decode(offset_norms[key]))
            dense[key] = torch.frombuffer(raw, dtype=getattr(torch, dt)).reshape(t.shape).clone()
            continue
        x = torch.from_numpy(np.array(reader.array(t.name)))
        if t.ggml_type == T.BF16:
            x = x.view(torch.bfloat16)
        n_rot = rope_heads(key, n_head, n_kv, arch) if permute else None
        if n_rot:
            x = unpermute_rows(x, n_rot)
        dense[key] = x.to(getattr(torch, dt))
    if tied and "lm_head.weight" in dense_dtypes:
        dense["lm_head.weight"] = dense["model.embed_tokens.weight"].to(getattr(torch, dense_dtypes["lm_head.weight"]))
    provenance = {**provenance, "read_from": str(file)}
    return QuantizedModel(
        hf_config=hf_config, quant_config=quant_config, linears=linears, dense=dense,
        provenance=provenance, assets=assets,
    )


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> GGML type name of a file (for reports and tests)."""
    return {n: t.ggml_type.name for n, t in GGUFFile(_gguf_file(path)).tensors.items()}
