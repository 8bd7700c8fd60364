"""``RuntimeOptions``: the switches of the built-in runtime's GPU decode path, in one frozen value.

Hand one to ``build_decoder(qm, device, options=RuntimeOptions(...))`` (or ``Decoder.set_options``);
the defaults are the fastest measured paths. Every switch only matters on a GPU: on the CPU the
runtime runs plain torch whatever they say. They are passed down explicitly to the kernel launches;
nothing here reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import UsageError
from ..kernels.config import DEQUANT_MIN_M


@dataclass(frozen=True)
class RuntimeOptions:
    # programmatic dependent launch (Hopper and newer): each kernel's launch and prologue overlap the
    # tail of the kernel before it
    pdl: bool = True
    # rows from which an INT4 linear dequantises its weight once and runs cuBLAS instead of the
    # transposed tensor-core tile (H100: the tile wins up to 256 rows)
    dequant_min_m: int = DEQUANT_MIN_M
    # bf16 one-token steps hand each GEMV its input already as fp16 x / 16 (kernels/x16.py; NVIDIA)
    x16: bool = True
    # one-token steps leave the residual add + RMSNorm to the next projection's merge kernel
    # (kernels/pending_norm.py): no norm kernel of their own
    pending_norm: bool = True
    # one-token steps build their attention mask, RoPE rows and embedding in one kernel
    # (kernels/decode_prologue.py), not a dozen small torch ops
    decode_prologue: bool = True
    # one row's lm_head runs on the Triton GEMV (kernels/dense_gemv.py, ~9 % faster than cuBLAS)
    head_gemv: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in (bool, "bool") and not isinstance(v, bool):
                raise UsageError(f"RuntimeOptions.{f.name} must be True or False, got {v!r}")
        m = self.dequant_min_m
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise UsageError(f"RuntimeOptions.dequant_min_m must be an integer >= 2 (rows from which an INT4 "
                             f"linear dequantises + runs cuBLAS; default {DEQUANT_MIN_M}), got {m!r}")

    @classmethod
    def parse(cls, spec: str) -> RuntimeOptions:
        """Options from ``"name=value,name=value"`` (booleans as 0/1, true/false, on/off; empty: the
        defaults), for command lines: ``"pdl=0,head_gemv=0"``, ``"dequant_min_m=129"``."""
        names = {f.name: f for f in fields(cls)}
        kw: dict[str, object] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip().lower()
            if not eq or name not in names:
                raise UsageError(f"runtime option {item!r}: expected name=value with name one of "
                                 f"{', '.join(names)}")
            if name == "dequant_min_m":
                if not value.isdigit():
                    raise UsageError(f"runtime option {item!r}: dequant_min_m takes an integer")
                kw[name] = int(value)
            elif value in ("1", "true", "on", "yes"):
                kw[name] = True
            elif value in ("0", "false", "off", "no"):
                kw[name] = False
            else:
                raise UsageError(f"runtime option {item!r}: {name} takes 0/1, true/false or on/off")
        return cls(**kw)

    def changed(self) -> dict[str, object]:
        """The fields that differ from the defaults (for logs and benchmark labels)."""
        default = RuntimeOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}
