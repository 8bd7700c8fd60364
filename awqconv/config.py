"""QuantConfig: the single source of quantization defaults.

The CLI and the Python API both build one frozen QuantConfig; click options default to None and
inherit from here so defaults cannot drift. It is serialized into every artifact's manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import CorruptFileError, InputError, UsageError

METHODS = ("awq", "rtn")


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 4
    group_size: int = 128  # -1 = one group per output channel (per-channel)
    zero_point: bool = True  # asymmetric (AutoAWQ default); False = symmetric, zeros fixed at 2**(b-1)
    method: str = "awq"  # "awq" (scale + clip search) or "rtn" (same grid, no search)
    # scale search (as AutoAWQ): s = x^a / w^(1-a) (duo) or x^a, a on a grid of n_grid
    duo_scaling: bool = True
    n_grid: int = 20
    search_scales: bool = True
    smooth_gqa_vo: bool = True  # v_proj -> o_proj under grouped-query attention (peers skip it)
    # clip search: per (row, group) clamp shrunk on a grid of clip_n_grid down to clip_max_shrink
    apply_clip: bool = True
    clip_n_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_n_tokens: int = 512
    # calibration: documents concatenated and cut into calib_samples blocks of calib_seq_len
    calib: str = "builtin"
    calib_samples: int = 128
    calib_seq_len: int = 512
    calib_text_column: str = "text"
    calib_split: str = "train"
    # tokens on which the search loss is evaluated (activation statistics always use every token);
    # None = all. Bounded by default so a CPU run of a small model stays in minutes.
    search_tokens: int | None = 8192
    scale_dtype: str | None = None  # None: bf16 for bf16 models, else fp16
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.w_bit <= 8:
            raise UsageError(f"w_bit={self.w_bit} (--w-bit) is not supported; use 2..8 (4 for AWQ runtimes)")
        if self.group_size != -1 and self.group_size <= 0:
            raise UsageError(f"group_size={self.group_size} (-g/--group-size) is invalid; use 32, 64, 128 or -1")
        if self.method not in METHODS:
            raise UsageError(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.scale_dtype not in (None, "float16", "bfloat16"):
            raise UsageError(f"scale_dtype={self.scale_dtype!r}: use float16 or bfloat16")
        if self.n_grid < 2 or self.clip_n_grid < 2:
            raise UsageError("n_grid (--n-grid) and clip_n_grid must be at least 2")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise UsageError("clip_max_shrink must lie in [0, 1)")
        if self.calib_samples <= 0 or self.calib_seq_len <= 0:
            raise UsageError("calib_samples and calib_seq_len (--calib-samples, --calib-seq-len) must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Read a manifest's ``quant_config``; a field of the wrong type is a CorruptFileError
        (``"false"`` is not a bool: it would read as True)."""
        if not isinstance(d, dict):
            raise CorruptFileError(f"quant_config must be a JSON object, got {type(d).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k, v in kw.items():
            if not _type_ok(known[k], v):
                raise CorruptFileError(f"quant_config.{k} = {v!r} has the wrong type (expected {known[k]})")
        if "modules_to_not_convert" in kw:
            kw["modules_to_not_convert"] = tuple(kw["modules_to_not_convert"] or ())
        try:
            return cls(**kw)
        except InputError as e:
            raise CorruptFileError(f"quant_config: {e}") from None

    def with_overrides(self, **kw: Any) -> "QuantConfig":
        """A copy with the given fields replaced; ``None`` values keep the current default."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _type_ok(annotation: str, v: Any) -> bool:
    """Whether a JSON value fits a field annotation (annotations are strings: postponed evaluation)."""
    ann = annotation.replace(" ", "")
    if v is None:
        return "None" in ann
    if ann.startswith("bool"):
        return type(v) is bool
    if ann.startswith("int"):
        return type(v) is int
    if ann.startswith("float"):
        return type(v) in (int, float)
    if ann.startswith("str"):
        return isinstance(v, str)
    if ann.startswith("tuple"):
        return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
    return True
