"""Model card (README.md) text for exported artifacts: how the file was made, and how to load it.

Everything comes from the QuantizedModel's quant_config and provenance; provenance keys read here:
``awqconv_version``, ``source_model``, ``command``, ``created``, ``calibration`` (a dict or a
string), ``modules_not_converted``. Missing keys are written as "unknown", never guessed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model import QuantizedModel


def awqconv_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("awqconv")
    except (ImportError, PackageNotFoundError):
        return "unknown"


def _calibration_line(qm: QuantizedModel) -> str:
    cal = qm.provenance.get("calibration")
    if isinstance(cal, dict):
        return ", ".join(f"{k}={v}" for k, v in cal.items())
    if cal:
        return str(cal)
    qc = qm.quant_config
    if qc.method == "rtn":
        return "none (round-to-nearest, no calibration)"
    return f"{qc.calib}, {qc.calib_samples} samples x {qc.calib_seq_len} tokens"


def render_model_card(qm: QuantizedModel, format_label: str, usage: str, notes: list[str] = (),
                      library_name: str = "transformers") -> str:
    """The README.md of one artifact. ``usage`` is a ready markdown block on loading it."""
    qc = qm.quant_config
    prov: dict[str, Any] = qm.provenance
    source = prov.get("source_model") or qm.hf_config.get("_name_or_path") or "unknown"
    version = prov.get("awqconv_version") or awqconv_version()
    group = "per-channel (one group per output row)" if qc.group_size == -1 else str(qc.group_size)
    method = {
        "awq": "AWQ (activation-aware scale search"
        + (" + clip search" if qc.apply_clip else "")
        + ")",
        "rtn": "round-to-nearest (no search)",
    }.get(qc.method, qc.method)
    skipped = prov.get("modules_not_converted") or list(qc.modules_to_not_convert)
    front = ["---", f"library_name: {library_name}", "pipeline_tag: text-generation",
             "tags: [awq, 4-bit, awqconv]"]
    if source != "unknown":
        front += [f"base_model: {source}", "base_model_relation: quantized"]
    front.append("---")
    rows = [
        ("Format", format_label),
        ("Source model", source),
        ("Method", method),
        ("Weight bits", str(qc.w_bit)),
        ("Group size", group),
        ("Zero point", "asymmetric" if qc.zero_point else "symmetric"),
        ("Calibration", _calibration_line(qm)),
        ("Quantized linears", str(len(qm.linears))),
        ("Kept in 16-bit", ", ".join(skipped) if skipped else "embeddings, norms, lm_head"),
        ("Made with", f"awqconv {version}"),
        ("Created", str(prov.get("created", "unknown"))),
    ]
    lines = front + ["", f"# {source.rstrip('/').split('/')[-1]}: {format_label}", "",
                     f"4-bit weight-only quantization of `{source}`, produced by awqconv.", "",
                     "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    command = prov.get("command")
    if command:
        lines += ["", "Command:", "", "```bash", str(command), "```"]
    lines += ["", "## Usage", "", usage.strip()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def fp16_scales_note(qm: QuantizedModel, also: str = "") -> str | None:
    """The note of a format that stores scales in fp16 when the model's scales are another dtype."""
    if not qm.linears or qm.dtype == torch.float16:
        return None
    return (f"Quantized with {str(qm.dtype).removeprefix('torch.')} scales; every scale is exactly "
            f"representable in fp16 (checked at export){also}.")
