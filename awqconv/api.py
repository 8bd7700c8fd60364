"""The Python entry points: plan(), convert(), export(), evaluate().

``convert`` runs the whole job: resolve the source, check every format constraint and the
output directory before any expensive work, calibrate, quantize once, then write every requested
artifact into ``out_dir/<format>`` through a temporary sibling directory renamed at the end.
``export`` re-lays an existing artifact out as other formats without re-quantizing.
The library never prints or exits; the CLI does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .config import QuantConfig
from .devices import resolve_device
from .errors import AwqconvError, FormatConstraintError, InputError, ShapeError, UsageError
from .formats import ExportRequest, Target, detect_format, get_format, needs_prescaled, parse_targets, read_artifact
from ._io import timestamp
from .formats.integrity import record
from .hfconfig import context_length
from .model import QuantizedModel
from .outdir import OutputLock, check_output, fmt_bytes, reserved, staged_output
from .quant.mappings import arch_spec, quantizable_slots, resolve_layer
from .quant.pipeline import scale_dtype_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:smollm2-135m"
DEFAULT_TARGETS = ("canonical", "hf-awq")


@dataclass
class Plan:
    """Everything decided before calibration starts (``--dry-run`` prints it)."""

    source: str
    path: Path
    hf_config: dict[str, Any]
    config: QuantConfig
    targets: list[Target]
    out_dir: Path
    linear_shapes: dict[str, tuple[int, int]]
    n_params: int
    scale_dtype: torch.dtype
    estimated_bytes: int
    mappings: list[str] = field(default_factory=list)  # resolved smoothing mappings of layer 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    inputs: list[Path] = field(default_factory=list)  # what -o may never overlap
    calib_blocks: Any = None  # CalibBlocks, tokenized once here and reused by convert()
    keep_prescaled: bool = False  # store the prescaled float weights in the canonical artifact

    def describe(self) -> str:
        c = self.config
        n_lin = len(self.linear_shapes)
        group = "per-channel" if c.group_size == -1 else str(c.group_size)
        lines = [
            f"source       {self.source} ({self.path})",
            f"architecture {self.hf_config.get('architectures', ['?'])[0]}, "
            f"{self.hf_config.get('num_hidden_layers')} layers, {self.n_params / 1e6:.1f}M parameters",
            f"quantize     {n_lin} linears, {c.method.upper()} w{c.w_bit} group {group}, "
            f"{'asymmetric' if c.zero_point else 'symmetric'}, scales {str(self.scale_dtype).removeprefix('torch.')}",
        ]
        if c.method == "awq":
            search = "all tokens" if c.search_tokens is None else f"{c.search_tokens} tokens"
            lines.append(
                f"calibration  {c.calib}: {c.calib_samples} blocks x {c.calib_seq_len} tokens; "
                f"search loss on {search}; duo_scaling={c.duo_scaling}, clip={c.apply_clip}, "
                f"gqa v->o={c.smooth_gqa_vo}"
            )
        if c.method == "awq" and self.mappings:
            lines.append(f"mappings     {len(self.mappings)} per layer: {'; '.join(self.mappings)}")
        if self.calib_blocks is not None:
            n, t = self.calib_blocks.ids.shape
            lines.append(f"calib data   {n} blocks x {t} tokens available")
        lines.append(f"device       {self.device}")
        kept = " (canonical keeps the prescaled weights)" if self.keep_prescaled else ""
        lines.append(f"outputs      {', '.join(t.label for t in self.targets)} -> {self.out_dir}/{kept}")
        lines.append(f"disk         ~{fmt_bytes(self.estimated_bytes)} needed")
        return "\n".join(lines)


@dataclass
class ConvertResult:
    out_dir: Path
    artifacts: dict[str, Path]  # target label -> directory
    model: QuantizedModel
    report: dict[str, Any] = field(default_factory=dict)


def build_config(config: QuantConfig | None = None, **overrides: Any) -> QuantConfig:
    return (config or QuantConfig()).with_overrides(**overrides)


def _meta_model(hf_config: dict[str, Any], path: Path, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{path} needs custom code from its repository; pass --trust-remote-code "
                             "if you trust it (it runs that Python code)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"transformers cannot build a model from {path / 'config.json'} ({first}); fix the config") from None


def estimate_bytes(shapes: dict[str, tuple[int, int]], n_params: int, bits: int, group_size: int,
                   targets: list[Target], keep_prescaled: bool = False) -> int:
    """Disk that writing ``targets`` needs: packed integers, scales and zeros, float dense tensors;
    peft's float weights and, with ``keep_prescaled``, the canonical artifact's prescaled floats
    at 2 bytes per weight."""
    lin_params = sum(o * i for o, i in shapes.values())
    per_target = lin_params * bits / 8 + (n_params - lin_params) * 2 + lin_params / max(group_size, 32) * 4
    floats = ("canonical", "peft") if keep_prescaled else ("peft",)
    extra = sum(2 * lin_params for t in targets if t.name in floats)
    return int(per_target * len(targets) + extra)


def _model_inputs(path: Path) -> list[Path]:
    """The model directory, and for a Hub snapshot the cached repository around it (its files are
    links into that repository's blobs)."""
    inputs = [path]
    if path.parent.name == "snapshots":
        inputs.append(path.parent.parent)
    return inputs


def _plan_calibration(cfg: QuantConfig, path: Path, hf_config: dict[str, Any], calib_data, trust_remote_code: bool):
    """Read and tokenize the calibration source now, so a missing, unreadable or too short one
    fails before any model is loaded; the blocks are reused by convert()."""
    from .quant.calib import build_blocks, load_calibration_texts
    from .sources import load_tokenizer

    ctx = context_length(hf_config)
    if ctx is not None and cfg.calib_seq_len > ctx:
        raise UsageError(f"--calib-seq-len {cfg.calib_seq_len} exceeds the model's context of {ctx} tokens "
                         f"(max_position_embeddings); use at most {ctx}")
    source = list(calib_data) if calib_data is not None and not isinstance(calib_data, str) else cfg.calib
    texts = load_calibration_texts(source, split=cfg.calib_split, text_column=cfg.calib_text_column, n_samples=None)
    return build_blocks(texts, load_tokenizer(path, trust_remote_code), cfg.calib_samples, cfg.calib_seq_len)


def _fitting_groups(shapes: dict[str, tuple[int, int]]) -> list[int]:
    ins = {i for _, i in shapes.values()}
    return [g for g in (32, 64, 128, 256) if all(i % g == 0 for i in ins)]


def plan(
    model: str | Path = DEFAULT_MODEL,
    to: str | Sequence[str] = DEFAULT_TARGETS,
    out_dir: str | Path = "out",
    config: QuantConfig | None = None,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str | torch.device | None = None,
    calib_data: str | Sequence[str] | None = None,
    keep_prescaled: bool = False,
) -> Plan:
    """Resolve the model and check every constraint (output directory, device, formats, disk,
    calibration data); nothing calibrated, nothing written."""
    from .sources import check_causal_lm, load_hf_config, resolve_model

    cfg = config or QuantConfig()
    targets = parse_targets(to)
    dev = resolve_device(device)
    local = [Path(x).expanduser() for x in (str(model), cfg.calib) if Path(x).expanduser().exists()]
    check_output(out_dir, overwrite=overwrite, inputs=local)  # the cheap checks first, before a download
    path = resolve_model(str(model), revision=revision)
    inputs = _model_inputs(path)
    if isinstance(cfg.calib, str) and Path(cfg.calib).expanduser().exists():
        inputs.append(Path(cfg.calib).expanduser())
    hf_config = load_hf_config(path)
    hf_config.pop("quantization_config", None)
    check_causal_lm(hf_config, path)
    arch = arch_spec(hf_config)  # unsupported architectures fail here, before any work
    if not hf_config.get("architectures"):  # inferred from model_type: the artifacts name it
        hf_config["architectures"] = [arch.arch]

    meta = _meta_model(hf_config, path, trust_remote_code)
    layers = meta.get_submodule(arch.layers_path)
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        for slot in quantizable_slots(layer, arch, cfg.modules_to_not_convert):
            shapes[f"{arch.layers_path}.{i}.{slot.name}"] = slot.shape
    mapping_names = [
        f"{m.prev.name} -> {','.join(s.name.rsplit('.', 1)[-1] for s in m.layers[:3])}{' (per kv channel)' if m.spec.vo else ''}"
        for m in resolve_layer(layers[0], arch, hf_config)
    ]
    if not shapes:
        raise InputError(f"{path}: no linear layers to quantize were found in the decoder blocks")
    if cfg.group_size != -1:
        bad = [(n, s) for n, s in shapes.items() if s[1] % cfg.group_size]
        if bad:
            name, (_, n_in) = bad[0]
            fits = _fitting_groups(shapes)
            hint = f"group sizes that fit every layer: {', '.join(map(str, fits))} or -1 (per channel)" if fits else "use --group-size -1 (per channel)"
            raise ShapeError(
                f"{name}: in_features={n_in} is not a multiple of group_size={cfg.group_size} "
                f"({len(bad)} of {len(shapes)} linears); {hint}, e.g. --group-size {fits[-1] if fits else -1}"
            )
    n_params = sum(p.numel() for p in meta.parameters())
    sdtype = scale_dtype_for(cfg, _config_dtype(hf_config))

    problems: list[str] = []
    for t in targets:
        req = ExportRequest(t, hf_config, cfg.w_bit, cfg.group_size, cfg.zero_point, sdtype, shapes)
        problems += [f"{t.label}: {p}" for p in get_format(t.name).plan(req)]
    if problems:
        raise FormatConstraintError("; ".join(problems))

    estimated = estimate_bytes(shapes, n_params, cfg.w_bit, cfg.group_size, targets, keep_prescaled)
    out = check_output(out_dir, overwrite=overwrite, inputs=inputs, needed_bytes=estimated)
    OutputLock(out).probe()
    blocks = None
    if cfg.method == "awq":
        blocks = _plan_calibration(cfg, path, hf_config, calib_data, trust_remote_code)
    return Plan(str(model), path, hf_config, cfg, targets, out, shapes, n_params, sdtype, estimated,
                mapping_names, dev, inputs, blocks, keep_prescaled)


def _config_dtype(hf_config: dict[str, Any]) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dt = getattr(torch, str(name), None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def convert(
    model: str | Path = DEFAULT_MODEL,
    to: str | Sequence[str] = DEFAULT_TARGETS,
    out_dir: str | Path = "out",
    config: QuantConfig | None = None,
    *,
    calib_data: str | Sequence[str] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: bool = True,
    search_grid: str | None = None,
    keep_prescaled: bool = False,
    resume: bool = False,
    activation_memory: int | None = None,
    **overrides: Any,
) -> ConvertResult:
    """Quantize ``model`` once and write every format in ``to`` under ``out_dir``.

    Example::

        res = awqconv.convert("Qwen/Qwen2.5-0.5B", to=["hf-awq", "gguf"], out_dir="out/", group_size=128)
        res.artifacts["hf-awq"]   # Path('out/hf-awq')

    ``search_grid="gguf:q4_0"`` makes the scale and clip search target a GGUF block type's own
    grid (the prescaled weights then suit that GGUF type best); the canonical integers are still
    taken on the QuantConfig grid.

    ``keep_prescaled=True`` also stores those prescaled float weights in the canonical artifact
    (``prescaled*.safetensors``, about 2 bytes per quantized weight) so that a later
    ``export --to gguf:q4_0`` (or a K-quant) re-quantizes them. Without it they are kept in memory
    only when a target of this run re-quantizes them, and a later export uses the dequantized
    canonical integers.

    Decoder layers are read from safetensors shards one at a time (``streaming.py``) and every
    finished layer is checkpointed beside the output (``quant/resume.py``): ``resume=True``
    continues a killed run of the same job from its last finished layer, with the same result.
    ``activation_memory`` bounds the calibration activations held in RAM (bytes; default half the
    available memory); the rest spill to disk.
    """
    cfg = build_config(config, **overrides)
    if isinstance(calib_data, str):
        cfg = cfg.with_overrides(calib=calib_data)
    grid = _search_grid(search_grid)
    p = plan(model, to, out_dir, cfg, overwrite=overwrite, trust_remote_code=trust_remote_code, revision=revision,
             device=device, calib_data=calib_data, keep_prescaled=keep_prescaled)
    with reserved(p.out_dir) as lock:  # one writer per output, from here to the final swap
        return _convert(p, cfg, calib_data, grid, search_grid, revision, trust_remote_code, progress, overwrite, lock,
                        resume, activation_memory)


def _fingerprint(p: Plan, cfg: QuantConfig, calib_hash, search_grid, keep_prescaled: bool) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one for its checkpoints to be reused."""
    files = sorted(f for f in p.path.iterdir() if f.suffix in (".safetensors", ".bin", ".json") and f.is_file())
    return {"awqconv": __version__, "torch": torch.__version__, "source": str(p.path),
            "source_files": {f.name: f.stat().st_size for f in files}, "config": cfg.to_dict(),
            "calibration": calib_hash, "search_grid": search_grid, "prescaled": keep_prescaled,
            "device": p.device.type}


def _convert(p: Plan, cfg, calib_data, grid, search_grid, revision, trust_remote_code, progress, overwrite, lock,
             resume: bool = False, activation_memory: int | None = None) -> ConvertResult:
    from .outdir import work_path
    from .quant.resume import resume_checkpoints
    from .quant.spill import ActivationBudget, default_budget

    t0 = time.time()
    report: dict[str, Any] = {}
    blocks, calib_hash = (None, None) if p.calib_blocks is None else p.calib_blocks
    if blocks is not None:
        report["calibration_blocks"] = int(blocks.shape[0])
    keep = p.keep_prescaled or needs_prescaled(p.targets)
    checkpoints, start = resume_checkpoints(work_path(p.out_dir), _fingerprint(p, cfg, calib_hash, search_grid, keep),
                                            resume)
    if start:
        log.warning("resuming: %d of %d layers were finished by the interrupted run", start,
                    p.hf_config.get("num_hidden_layers", 0))
    budget = ActivationBudget(default_budget() if activation_memory is None else activation_memory,
                              checkpoints.dir / "spill")
    try:
        return _quantize_and_write(p, cfg, calib_data, grid, search_grid, revision, progress, overwrite, lock,
                                   report, t0, trust_remote_code, checkpoints, start, keep, budget)
    except AwqconvError:  # a problem of the input or a format: --resume could not get past it
        checkpoints.remove()
        raise
    except BaseException:  # killed, out of memory or disk, a device error: the finished layers stay
        done = checkpoints.done()
        if done:
            log.warning("%d finished layers are kept in %s: rerun the same command with --resume to continue",
                        done, checkpoints.dir)
        else:
            checkpoints.remove()
        raise


def _quantize_and_write(p: Plan, cfg, calib_data, grid, search_grid, revision, progress, overwrite, lock, report,
                        t0, trust_remote_code, checkpoints, start, keep, budget) -> ConvertResult:
    from .outdir import temp_prefix
    from .quant.pipeline import quantize_model
    from .sources import collect_assets, load_causal_lm
    from .streaming import open_streamed

    src = open_streamed(p.path, p.hf_config, arch_spec(p.hf_config).layers_path, trust_remote_code)
    hf_model = src.model if src is not None else load_causal_lm(p.path, trust_remote_code=trust_remote_code)[0]
    report["streamed"] = src is not None
    blocks, calib_hash = (None, None) if p.calib_blocks is None else p.calib_blocks
    qout = quantize_model(hf_model, p.hf_config, cfg, blocks, search_grid=grid, device=p.device,
                          progress=progress, keep_prescaled=keep,
                          load_layer=None if src is None else src.load_layer, checkpoints=checkpoints,
                          start_layer=start, budget=budget)
    del hf_model, src
    report.update(qout.report)
    report["resumed_from_layer"] = start
    report["seconds_quantize"] = round(time.time() - t0, 1)

    provenance = {
        "awqconv_version": __version__,
        "source_model": p.source,
        "source_path": str(p.path),
        "revision": revision,
        "created": timestamp(),
        "calibration": None if cfg.method == "rtn" else (cfg.calib if isinstance(calib_data, (str, type(None))) else "python-list"),
        "calibration_hash": calib_hash,
        "calibration_blocks": report.get("calibration_blocks"),
        "torch_version": torch.__version__,
        "modules_not_converted": qout.report["modules_not_converted"],
        "search_grid": search_grid or "canonical integer grid",
    }
    qm = QuantizedModel(
        hf_config=p.hf_config,
        quant_config=cfg,
        linears=qout.linears,
        dense=qout.dense,
        search=qout.search,
        provenance=provenance,
        assets=collect_assets(p.path),
        prescaled=qout.prescaled,
        keep_prescaled=p.keep_prescaled,
        importance=qout.importance,
    )
    if qm.importance is not None:  # llama.cpp's imatrix names the text it was computed on
        qm.importance.datasets = [str(provenance["calibration"])]
    artifacts = write_artifacts(qm, p.targets, p.out_dir, overwrite=overwrite, inputs=p.inputs, lock=lock)
    # only now: a failed write resumes straight to writing. The integers are still read from the
    # checkpoint files (StoredLinears), which leave --resume's way and go with the model object
    checkpoints.retire(p.out_dir.parent / f"{temp_prefix(p.out_dir)}results-{os.getpid()}", qm)
    report["seconds_total"] = round(time.time() - t0, 1)
    return ConvertResult(p.out_dir, artifacts, qm, report)


def _search_grid(spec: str | None):
    if spec is None or spec in ("int", "canonical"):
        return None
    kind, _, variant = spec.partition(":")
    if kind != "gguf" or not variant:
        raise UsageError(f"--search-grid {spec!r}: use 'int' or 'gguf:<type>' (e.g. gguf:q4_0)")
    from .quant.gguf_grid import GGUFGrid

    try:
        return GGUFGrid(variant)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--search-grid {spec!r}: {e}") from None


def write_artifacts(qm: QuantizedModel, targets: list[Target], out_dir: str | Path, overwrite: bool = False,
                    inputs: Sequence[str | Path] = (), lock: OutputLock | None = None,
                    also: Callable[[Path], Any] | None = None) -> dict[str, Path]:
    """Write each target into ``out_dir/<target>`` with its checksum manifest: all or nothing.

    A model that fails validation (NaN/inf values, malformed integers) is refused before a byte
    is written; ``-o`` may not overlap ``inputs``."""
    qm.validate("the model to write")
    out = Path(out_dir)
    with staged_output(out, overwrite=overwrite, inputs=inputs, lock=lock) as tmp:
        for t in targets:
            sub = tmp / t.dirname
            sub.mkdir()
            get_format(t.name).write(qm, sub, t.variant)
            if also is not None:
                also(sub)
            record(sub, t.label, qm.provenance, qm.quant_config.to_dict())
    return {t.label: out / t.dirname for t in targets}


def load(path: str | Path) -> QuantizedModel:
    """Read any awqconv artifact (canonical, hf-awq, gguf transplant, exllamav2, peft) as canonical,
    after checking its files against the checksums recorded when it was written."""
    return read_artifact(path)[0]


def export(
    artifact: str | Path,
    to: str | Sequence[str],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    adapter: str | Path | None = None,
    adapter_mode: str = "separate",
    revision: str | None = None,
) -> dict[str, Path]:
    """Re-lay an existing artifact out as other formats; never re-quantizes (except an adapter merge).

    ``artifact`` is a directory (or .gguf file), or the Hub id of an AWQ checkpoint (any tool's
    AutoAWQ GEMM layout, downloaded with the safetensors and tokenizer files at ``revision``)."""
    targets = parse_targets(to)
    extra = [Path(adapter)] if adapter is not None else []
    check_output(out_dir, overwrite=overwrite, inputs=[Path(artifact)] + extra)  # before reading anything big
    src = _artifact_source(artifact, revision)
    inputs = _model_inputs(src) + extra
    qm, _ = read_artifact(src)
    qm.provenance.setdefault("source_model", str(artifact))
    if revision is not None:
        qm.provenance.setdefault("revision", revision)
    for t in targets:
        req = ExportRequest(
            t,
            qm.hf_config,
            qm.quant_config.w_bit,
            qm.quant_config.group_size,
            qm.quant_config.zero_point,
            qm.dtype,
            {n: (p.out_features, p.in_features) for n, p in qm.linears.items()},
        )
        problems = get_format(t.name).plan(req)
        if problems:
            raise FormatConstraintError(f"{t.label}: {'; '.join(problems)}")
    shapes = {n: (p.out_features, p.in_features) for n, p in qm.linears.items()}
    n_params = sum(o * i for o, i in shapes.values()) + sum(t.numel() for t in qm.dense.values())
    needed = estimate_bytes(shapes, n_params, qm.quant_config.w_bit, qm.quant_config.group_size, targets,
                            qm.keep_prescaled and qm.prescaled is not None)
    check_output(out_dir, overwrite=overwrite, inputs=inputs, needed_bytes=needed)
    if adapter is None:
        return write_artifacts(qm, targets, out_dir, overwrite=overwrite, inputs=inputs)
    from .formats.adapter import apply_adapter, copy_adapter

    qm, report = apply_adapter(qm, Path(adapter), mode=adapter_mode)
    log.warning("%s", report.summary())
    # runtimes that apply LoRA themselves get the adapter beside each export (inside it, checksummed)
    beside = (lambda d: copy_adapter(Path(adapter), d)) if adapter_mode == "separate" else None
    return write_artifacts(qm, targets, out_dir, overwrite=overwrite, inputs=inputs, also=beside)


def _artifact_source(artifact: str | Path, revision: str | None) -> Path:
    """A local artifact path as given (read_artifact names what is wrong with it), or the snapshot of
    a Hub id that is no local path."""
    from .sources import looks_like_hub_id, resolve_model

    text = str(artifact)
    if os.path.lexists(text) or not looks_like_hub_id(text):
        if revision is not None:
            raise UsageError(f"--revision applies to a Hub id; {text} is a local path")
        return Path(artifact)
    return resolve_model(text, revision=revision, artifact=True)


def evaluate(path: str | Path, text: str, seq_len: int = 512, max_windows: int | None = None, device: str | None = None) -> float:
    """Perplexity on ``text`` of an artifact's fake-quant reference model, or of a float HF model dir."""
    from .evaluate import perplexity
    from .sources import load_causal_lm

    dev = resolve_device(device)
    p = Path(path)
    if p.is_dir() and (p / "config.json").exists() and detect_format(p) is None:
        model, tok = load_causal_lm(p)
        ctx = context_length(model.config.to_dict())
    else:
        from .reference import load_tokenizer_from_assets, reference_model

        qm, _ = read_artifact(p)
        ctx = context_length(qm.hf_config)
        model, tok = reference_model(qm), load_tokenizer_from_assets(qm)
    if ctx is not None and seq_len > ctx:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {ctx} tokens; use at most {ctx}")
    model.to(dev)
    return perplexity(model, tok, text, seq_len=seq_len, max_windows=max_windows)
