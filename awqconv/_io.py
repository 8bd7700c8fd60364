"""File helpers shared by every writer and reader: JSON, sharded safetensors, dtype names.

Safetensors files are read with errors that name the file and the fix. Output directories
(temporary siblings, locks, swaps) live in ``outdir.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CorruptFileError, InputError

SHARD_SIZE = "5GB"


def timestamp() -> str:
    """Now as ISO 8601 UTC, or ``SOURCE_DATE_EPOCH`` when set: the reproducible-builds convention,
    so that two runs of the same job (an interrupted one resumed, say) write the same bytes."""
    import os
    from datetime import datetime, timezone

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def parse_size(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2e9"`` -> bytes (SI units powers of 1000, IEC units of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 4GB, 512MiB or 2e9")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(unit[:1] or " "))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); re-create it") from None


def save_sharded(
    tensors: dict[str, Tensor],
    out_dir: Path,
    metadata: dict[str, str] | None = None,
    prefix: str = "model",
    max_shard_size: str | int = SHARD_SIZE,
) -> list[str]:
    """Write ``prefix.safetensors`` or ``prefix-0000k-of-0000N.safetensors`` + index; return the files."""
    from huggingface_hub import save_torch_state_dict

    meta = {"format": "pt", **(metadata or {})}
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_torch_state_dict(
        contiguous,
        out_dir,
        filename_pattern=prefix + "{suffix}.safetensors",
        max_shard_size=max_shard_size,
        metadata=meta,
        safe_serialization=True,
        force_contiguous=True,
    )
    return sorted(p.name for p in out_dir.glob(f"{prefix}*.safetensors"))


def unshare_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Clone tensors that share storage (tied embeddings): huggingface_hub would drop all but one."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if ident is not None and ident in seen:
            t = t.clone()
        elif ident is not None:
            seen.add(ident)
        out[k] = t.contiguous()
    return out


def safetensors_files(directory: Path, prefix: str = "model") -> list[Path]:
    """The shard files of a checkpoint, from its index when there is one."""
    index = directory / f"{prefix}.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CorruptFileError(f"{index} names missing shard(s) {missing}; re-download or re-export")
        return files
    single = directory / f"{prefix}.safetensors"
    if single.exists():
        return [single]
    return sorted(directory.glob(f"{prefix}*.safetensors"))


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Load one file, turning truncation and corruption into a clear CorruptFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
            "it may be truncated: re-download or re-export it"
        ) from None


def load_checkpoint(directory: Path, prefix: str = "model") -> dict[str, Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    files = safetensors_files(directory, prefix)
    if not files:
        raise InputError(f"no {prefix}*.safetensors in {directory}")
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(load_safetensors(f))
    return out


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e})") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CorruptFileError(f"unknown dtype name {name!r} in manifest")
    return dt
