"""Helpers shared by the writers/readers of Hugging Face-style checkpoint directories.

hf-awq, exllamav2 and peft write the same kind of directory in the same order:

1. :func:`check_linears`: every linear well-formed, then the format's own constraints, all
   refused at once (the first problem and how many more) before a byte is written;
2. :func:`collect_tensors`: each linear's re-laid-out parts under ``{name}.{part}``, then the
   dense tensors under their HF keys (a collision is refused);
3. :func:`write_hf_dir`: ``model*.safetensors`` shards (+ index) through ``_io.save_sharded``,
   side files, the source model's tokenizer and generation files, ``config.json``, the format's
   own JSON manifest and the ``README.md`` model card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import save_sharded, unshare_storage, write_json
from ..errors import FormatConstraintError, InputError, ShapeError
from ..model import QuantizedModel
from ..packed import PackedLinear

_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")
MODEL_CARD = "README.md"

log = logging.getLogger(__name__)


# -- writing ---------------------------------------------------------------------------------


def check_linears(qm: QuantizedModel, problems: Callable[[str, PackedLinear], list[str]] | None = None,
                  model_problems: Iterable[str] = ()) -> None:
    """Validate every linear (ShapeError), then refuse ``model_problems`` + ``problems(name, p)``."""
    found = list(model_problems)
    for name, p in qm.linears.items():
        p.validate(name)
        if problems is not None:
            found += problems(name, p)
    refuse(found)


def refuse(problems: list[str]) -> None:
    """FormatConstraintError with the first problem and how many more there are; nothing if none."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FormatConstraintError(problems[0] + more)


def collect_tensors(
    qm: QuantizedModel,
    linear: Callable[[str, PackedLinear], dict[str, Tensor]],
    dense: dict[str, Tensor] | None = None,
    cast: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{name}.{part}`` for each linear's parts (``linear(name, p)``), then the dense tensors
    (``qm.dense`` unless given, through ``cast(key, t)``, by default unchanged on the CPU)."""
    tensors: dict[str, Tensor] = {}
    for name, p in qm.linears.items():
        for part, t in linear(name, p).items():
            tensors[f"{name}.{part}"] = t
    for key, t in (qm.dense if dense is None else dense).items():
        if key in tensors:
            raise ShapeError(f"dense tensor {key} collides with a quantized linear's tensor")
        tensors[key] = t.detach().cpu() if cast is None else cast(key, t)
    return tensors


def exact_fp16(t: Tensor, label: str, stored_by: str) -> Tensor:
    """``t`` in fp16, refusing any value fp16 cannot hold exactly (bf16 scales below 6e-5, say)."""
    t = t.detach().cpu()
    h = t.to(torch.float16)
    if t.dtype != torch.float16 and not torch.equal(h.to(t.dtype), t):
        wrong = h.to(t.dtype) != t
        bad = wrong.nonzero()[0].tolist()
        n = int(wrong.sum())
        others = f" (and {n - 1} more)" if n > 1 else ""
        raise FormatConstraintError(
            f"{label}[{', '.join(map(str, bad))}] = {t[tuple(bad)].item():.6g} is not exactly "
            f"representable in fp16{others}, which {stored_by} stores; quantize with --scale-dtype float16 "
            "or use the canonical format"
        )
    return h


def write_hf_dir(
    out_dir: Path,
    qm: QuantizedModel,
    tensors: dict[str, Tensor],
    *,
    label: str,
    own_files: Iterable[str],
    config: dict[str, Any],
    card: str,
    manifests: dict[str, Any] | None = None,
    side_tensors: dict[str, tuple[dict[str, Tensor], dict[str, str]]] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write one HF-style checkpoint directory into the existing empty ``out_dir``.

    ``tensors`` become ``model*.safetensors`` (sharded, with an index when large);
    ``side_tensors`` maps a relative path to ``(tensors, metadata)`` for extra safetensors files
    loaders do not pick up; ``manifests`` maps a file name to a JSON object; ``own_files`` are
    names this format writes itself, so assets of those names are not copied; ``metadata`` goes into
    every shard's header (``{"format": "pt"}`` unless it says otherwise). Returns the shards.
    """
    out_dir = Path(out_dir)
    shards = save_sharded(unshare_storage(tensors), out_dir, metadata=metadata, prefix="model")
    if side_tensors:
        from safetensors.torch import save_file

        for rel, (side, metadata) in side_tensors.items():
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(unshare_storage(side), str(out_dir / rel), metadata=metadata)
    write_assets(out_dir, qm.assets, frozenset(own_files), label)
    write_json(out_dir / "config.json", config)
    for fname, obj in (manifests or {}).items():
        write_json(out_dir / fname, obj)
    (out_dir / MODEL_CARD).write_text(card)
    return shards


def write_assets(out_dir: Path, assets: dict[str, bytes], own_files: frozenset[str] | set[str],
                 label: str = "export") -> None:
    """Write tokenizer/generation files verbatim, skipping names the format writes itself and weights.

    A name may hold sub-directories, never an absolute path or ``..``: an asset stays inside the artifact.
    """
    for fname, data in assets.items():
        if fname in own_files or fname.endswith(_WEIGHT_SUFFIXES[:2]):
            log.info("%s: not copying asset %s; the writer creates its own", label, fname)
            continue
        rel = Path(fname)
        if not rel.parts or rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"asset name {fname!r} is not a relative path; refusing to write outside {out_dir}")
        target = Path(out_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


# -- reading ---------------------------------------------------------------------------------


def read_assets(path: Path, own_files: frozenset[str] | set[str]) -> dict[str, bytes]:
    """Every other top-level file (tokenizer, generation config, chat template), verbatim."""
    assets = {}
    for f in sorted(Path(path).iterdir()):
        n = f.name
        if not f.is_file() or n.startswith(".") or n in own_files or n.endswith(_WEIGHT_SUFFIXES):
            continue
        assets[n] = f.read_bytes()
    return assets


def quant_method(path: Path) -> str | None:
    """``config.json``'s ``quantization_config.quant_method`` (lower-cased), or None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return quant_method_of(json.loads(cfg.read_text()))
    except (OSError, ValueError):
        return None


def quant_method_of(config: object) -> str | None:
    """The lower-cased ``quantization_config.quant_method`` of a parsed config.json, or None."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return str(q.get("quant_method", "")).lower() if isinstance(q, dict) else None


def manifest_format(path: Path, manifest: str) -> str | None:
    """The ``format`` field of a JSON manifest in ``path``, or None when absent or unreadable."""
    f = Path(path) / manifest
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def side_manifest(path: Path, name: str, format_id: str) -> dict[str, Any]:
    """The writer's side file ``name`` (what the format cannot hold) when it is ours, else ``{}``."""
    from .._io import read_json

    f = path / name
    if not f.is_file():
        return {}
    m = read_json(f)
    return m if isinstance(m, dict) and m.get("format") == format_id else {}


def source_config(config: dict[str, Any], overrides: dict[str, Any] | None,
                  quant_keys: Iterable[str] = ("quantization_config",)) -> dict[str, Any]:
    """config.json minus what the writer added (its ``config_overrides``: keys it added, values it
    changed); a foreign file just loses its quantization keys."""
    drop = set(quant_keys)
    cfg = {k: v for k, v in config.items() if k not in drop}
    if not isinstance(overrides, dict):
        return cfg
    for k in overrides.get("absent", []):
        cfg.pop(k, None)
    cfg.update({k: v for k, v in overrides.get("values", {}).items() if k not in drop})
    return cfg
