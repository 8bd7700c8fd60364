"""The ``quantization_config`` of compressed-tensors checkpoints: the one awqconv writes, and the
checks that refuse, by name, every scheme whose weights the canonical integers cannot hold exactly.

Written as compressed-tensors' ModelCompressor.update_config writes it (keys of
QuantizationConfig.model_dump plus ``version``, ``sparsity_config``, ``transform_config``), weights
args as QuantizationArgs serializes them when only the fields below are given: the pydantic models
forbid unknown keys, so nothing else is added (no ``zp_dtype`` / ``observer``, which older releases
reject). Plain dicts: formats never need the compressed-tensors package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CorruptFileError, FormatConstraintError

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
# the release whose pack-quantized layout and config keys the writer follows (fixed, so that an
# export does not depend on what happens to be installed; 4-bit packing is the same in all releases)
CT_VERSION = "0.20.1"
# presets a config group may name instead of a scheme: (symmetric, group_size)
_PRESETS = {"W4A16": (True, 128), "W4A16_ASYM": (False, 128)}
# other formats, and what they hold that pack-quantized W4A16 does not
_OTHER_FORMATS = {
    "dense": "unquantized or fake-quantized float weights",
    "int-quantized": "8-bit integer weights, one per int8",
    "naive-quantized": "integer weights stored one per int8, unpacked",
    "float-quantized": "FP8 weights",
    "marlin-24": "2:4-sparse weights in the Marlin-24 layout",
    "sparse-bitmask": "bitmask-sparse weights",
    "sparse-24-bitmask": "2:4-sparse weights",
    "nvfp4-pack-quantized": "FP4 (NVFP4) weights",
    "mxfp4-pack-quantized": "FP4 (MXFP4) weights",
    "mxfp6-pack-quantized": "FP6 (MXFP6) weights",
    "mxfp8-quantized": "FP8 (MXFP8) weights",
}
READS = "awqconv reads compressed-tensors pack-quantized W4A16 (4-bit integer weights, 16-bit activations) only"


@dataclass(frozen=True)
class WeightScheme:
    """A pack-quantized INT4 weight scheme; ``group_size`` -1 is the ``channel`` strategy."""

    symmetric: bool
    group_size: int

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    def weights_args(self) -> dict[str, Any]:
        return {
            "num_bits": 4,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": None if self.group_size == -1 else self.group_size,
            "strategy": self.strategy,
            "dynamic": False,
        }


def quantization_config(scheme: WeightScheme, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json: every ``Linear`` not in ``ignore`` is quantized."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": scheme.weights_args(),
                "input_activations": None,
                "output_activations": None,
                "format": PACK_QUANTIZED,
            }
        },
        "format": PACK_QUANTIZED,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def check_quantization_config(q: Any, where: str) -> list[WeightScheme]:
    """The weight schemes of a compressed-tensors config, refusing what awqconv cannot represent."""
    if not isinstance(q, dict):
        raise CorruptFileError(f"{where}: quantization_config is not a JSON object")

    def refuse(what: str, fix: str = "") -> FormatConstraintError:
        return FormatConstraintError(f"{where}: {what}; {READS}" + (f" ({fix})" if fix else ""))

    fmt = q.get("format")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CorruptFileError(f"{where}: quantization_config has no config_groups")
    if fmt != PACK_QUANTIZED and fmt != "mixed-precision":
        raise refuse(f"format {fmt!r} holds {_OTHER_FORMATS.get(fmt, 'weights in another layout')}")
    sparsity = q.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity and sparsity.get("format", "dense") != "dense":
        raise refuse(f"sparsity compressor {sparsity.get('format')!r} (sparse weights)")
    if q.get("transform_config"):
        raise refuse("transform_config rotates the weights (Hadamard/SpinQuant-style transforms), "
                     "so they are not (q - z) * s alone")
    if q.get("kv_cache_scheme"):
        raise refuse("kv_cache_scheme quantizes the KV cache (activation quantization)")
    status = q.get("quantization_status")
    if status not in (None, "compressed"):
        raise refuse(f"quantization_status {status!r}: the weights are not stored compressed")
    return [_check_group(name, g, fmt, refuse) for name, g in groups.items()]


def _check_group(name: str, group: Any, fmt: Any, refuse) -> WeightScheme:
    if isinstance(group, list):  # a preset name mapped to its targets
        if name.upper() not in _PRESETS:
            raise refuse(f"config group {name!r} names preset scheme {name!r}")
        sym, g = _PRESETS[name.upper()]
        return WeightScheme(sym, g)
    if not isinstance(group, dict):
        raise CorruptFileError(f"config group {name!r} is not a JSON object")
    for act in ("input_activations", "output_activations"):
        a = group.get(act)
        if a:
            bits = a.get("num_bits", "?") if isinstance(a, dict) else "?"
            kind = a.get("type", "int") if isinstance(a, dict) else "?"
            raise refuse(f"config group {name!r} quantizes {act} to {bits}-bit {kind} (W4A8/W8A8-style "
                         "activation quantization)", "awqconv artifacts are weight-only")
    gfmt = group.get("format")
    if gfmt not in (None, PACK_QUANTIZED) or (gfmt is None and fmt != PACK_QUANTIZED):
        raise refuse(f"config group {name!r} has format {gfmt!r} "
                     f"({_OTHER_FORMATS.get(gfmt, 'not pack-quantized')})")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise refuse(f"config group {name!r} does not quantize weights")
    if str(w.get("type", "int")).lower() != "int":
        raise refuse(f"config group {name!r} has {w.get('type')} weights (floating-point quantization)")
    bits = w.get("num_bits", 8)
    if bits != 4:
        raise refuse(f"config group {name!r} has {bits}-bit weights", "awqconv's integer formats are 4-bit")
    group_size = w.get("group_size")
    strategy = w.get("strategy")
    if strategy is None:  # inferred the way QuantizationArgs infers it
        strategy = "tensor" if group_size is None else "group" if group_size > 0 else "channel"
    strategy = str(strategy).lower()
    if strategy not in ("group", "channel"):
        raise refuse(f"config group {name!r} uses the {strategy!r} strategy",
                     "only 'group' and 'channel' scales map onto per-group integers")
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise CorruptFileError(
            f"config group {name!r}: strategy 'group' needs a positive group_size, got {group_size!r}")
    actorder = w.get("actorder")
    if actorder is True or str(actorder).lower() in ("group", "dynamic"):
        raise refuse(f"config group {name!r} uses act-order {actorder!r} (weight_g_idx permutes the groups)",
                     "re-quantize with actorder null or 'weight'")
    if w.get("dynamic"):
        raise refuse(f"config group {name!r} has dynamic weight quantization")
    if w.get("block_structure") is not None:
        raise refuse(f"config group {name!r} uses block_structure {w.get('block_structure')}")
    return WeightScheme(bool(w.get("symmetric", True)), group_size if strategy == "group" else -1)
