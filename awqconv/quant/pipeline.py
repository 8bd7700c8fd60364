"""The layer loop: calibrate, search scales, fold them, search clips, quantize — one layer at a time.

Only one decoder layer is resident on the compute device (CUDA when present, else CPU) and it is
upcast to fp32 there, so the search and its losses cannot overflow in fp16 and bf16 models work.
The next layer is calibrated on this layer's *float* outputs (as AutoAWQ and llm-awq do).
Activation statistics (x_mean) use every calibration token. A mapping scored on its linears alone
(v->o, up->down) scores every token too, through the Gram matrix of its input. A mapping scored
on a parent block (attention, MLP) scores ``search_tokens`` tokens (the search subset), to keep CPU
runs in minutes; the subset is blocks spread evenly over the calibration set, not its first blocks,
so a file whose documents change topic along the way is searched on all of its topics.
The model passed in is consumed: each layer is moved to the meta device once quantized.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..errors import InputError
from ..model import ImportanceMatrix, ScaleRecord, SearchResults
from ..packed import PackedLinear
from .capture import ActivationRecorder, Chunk, capture_layer_inputs, fit_kwargs, run_module, sample_module_inputs, subsample
from .grid import Grid, IntGrid
from .importance import ImportanceRecorder
from .mappings import ArchSpec, LinearSlot, ResolvedMapping, arch_spec, quantizable_slots, resolve_layer
from .moe import routed_inputs
from .resume import LayerCheckpoints, LayerResult, StoredLinears, merge
from .search import apply_clip, apply_scale, input_scale, search_clip, search_scale
from .spill import ActivationBudget, ChunkStore, default_budget

log = logging.getLogger(__name__)


@dataclass
class QuantizeOutput:
    linears: dict[str, PackedLinear]
    dense: dict[str, Tensor]
    search: SearchResults
    prescaled: dict[str, Tensor] | None
    report: dict[str, Any] = field(default_factory=dict)
    importance: ImportanceMatrix | None = None  # AWQ only: statistics of the prescaled weights' inputs


def compute_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def scale_dtype_for(cfg: QuantConfig, src: torch.dtype) -> torch.dtype:
    if cfg.scale_dtype is not None:
        return getattr(torch, cfg.scale_dtype)
    return torch.bfloat16 if src == torch.bfloat16 else torch.float16


def int_grid_for(cfg: QuantConfig, scale_dtype: torch.dtype) -> IntGrid:
    return IntGrid(cfg.w_bit, cfg.group_size, cfg.zero_point, scale_dtype)


def _get(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    hf_config: dict[str, Any],
    cfg: QuantConfig,
    blocks: Tensor | None,
    *,
    search_grid: Grid | None = None,
    device: str | torch.device | None = None,
    chunk_blocks: int = 8,
    keep_prescaled: bool = True,
    progress: bool = True,
    search_spread: bool = True,
    clip_all: bool = False,
    load_layer: Callable[[int], None] | None = None,
    checkpoints: LayerCheckpoints | None = None,
    start_layer: int = 0,
    budget: ActivationBudget | None = None,
) -> QuantizeOutput:
    """Quantize every decoder-layer linear of ``model``; ``blocks`` are calibration token ids
    ``[n, seq]`` (unused for RTN). ``search_grid`` defaults to the canonical integer grid.

    ``load_layer(i)`` materializes layer ``i`` just before it is needed (a streamed source keeps
    the decoder layers on the meta device until then). ``checkpoints`` records every finished layer;
    ``start_layer`` > 0 continues a run from them (layers before it are read back, not recomputed).
    ``budget`` bounds the calibration activations held in memory (the rest spill to disk; default
    half the available memory, spilling to a temporary directory).
    ``search_spread=False`` (search the first blocks) and ``clip_all=True`` (clip samples drawn
    from every block, holding every token's inputs: small models only) exist for the quality
    comparison in benchmarks/quality_peers.py."""
    arch = arch_spec(hf_config)
    dev = compute_device(device)
    src_dtype = model_dtype(model)
    sdtype = scale_dtype_for(cfg, src_dtype)
    int_grid = int_grid_for(cfg, sdtype)
    grid: Grid = search_grid or int_grid
    awq = cfg.method == "awq"
    layers: nn.ModuleList = _get(model, arch.layers_path)
    if start_layer and checkpoints is None:
        raise ValueError("start_layer needs the checkpoints to continue from")

    with contextlib.ExitStack() as stack:
        chunks: ChunkStore | None = None
        n_search_chunks = 0
        if awq:
            if blocks is None or blocks.numel() == 0:
                raise InputError("AWQ needs calibration blocks; pass calibration data or use --method rtn")
            if budget is None:
                budget = ActivationBudget(default_budget(), Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="awqconv-activations-"))))
            seq = blocks.shape[1]
            n_search_blocks = blocks.shape[0] if cfg.search_tokens is None else max(1, math.ceil(cfg.search_tokens / seq))
            if search_spread:
                blocks = blocks[search_first_order(blocks.shape[0], n_search_blocks)]
            captured = capture_layer_inputs(model, layers, blocks, chunk_blocks, dev)
            if start_layer:  # the kwargs (masks, positions) are recomputed; the hidden states are read back
                from safetensors.torch import load_file

                files = checkpoints.inputs(start_layer)
                captured = [Chunk(load_file(str(f))["hidden"], c.kwargs) for f, c in zip(files, captured, strict=True)]
            chunks = ChunkStore.of(captured, dev, budget)
            del captured
            n_search_chunks = max(1, math.ceil(min(n_search_blocks, blocks.shape[0]) / chunk_blocks))

        out = QuantizeOutput({}, {}, SearchResults(), {} if keep_prescaled else None)
        if awq:
            out.importance = ImportanceMatrix({}, {}, chunk_size=int(blocks.shape[1]), chunk_count=int(blocks.shape[0]),
                                              datasets=[str(cfg.calib)])
        # with checkpoints, finished layers' integers (and prescaled weights) stay in their files: name -> layer
        stored: dict[str, dict[str, int]] | None = None if checkpoints is None else {"q": {}, "p": {}}
        t0 = time.time()
        bar = tqdm(range(len(layers)), desc=f"{cfg.method.upper()} {cfg.w_bit}-bit", unit="layer", disable=not progress,
                   initial=0)
        for i in bar:
            prefix = f"{arch.layers_path}.{i}."
            if i < start_layer:
                _keep(checkpoints.load(i), i, out, stored)  # resuming implies checkpoints, so `stored`
                layers[i].to("meta")
                continue
            if load_layer is not None:
                load_layer(i)
            layer = layers[i].to(device=dev, dtype=torch.float32)
            found = SearchResults()
            if awq:
                nxt, gain = _search_layer(layer, arch, hf_config, cfg, grid, chunks, n_search_chunks, prefix, found,
                                          clip_all, out.importance)
                chunks.release()
                chunks = nxt
                bar.set_postfix(loss_ratio=f"{gain:.3f}")
            result = _quantize_layer(layer, arch, cfg, int_grid, src_dtype, prefix, found, keep_prescaled)
            if out.importance is not None:
                result.importance = {k: (v, out.importance.counts[k]) for k, v in out.importance.sums.items()
                                     if k.startswith(prefix)}
            if checkpoints is not None:
                last = i + 1 == len(layers)
                checkpoints.save(i, result, None if not awq or last else (chunks.hidden(j) for j in range(len(chunks))))
            _keep(result, i, out, stored)
            layers[i].to("meta")  # free it: the quantized copy lives in `out` (or its checkpoint)
        if chunks is not None:
            chunks.release()
        if stored is not None:
            out.linears = StoredLinears(checkpoints, stored["q"])
            if out.prescaled is not None:
                out.prescaled = StoredLinears(checkpoints, stored["p"], "p")
        out.report["seconds_layers"] = round(time.time() - t0, 1)
        if budget is not None:
            out.report["activations_spilled_bytes"] = budget.spilled

    for key, t in model.state_dict().items():
        if key.startswith(arch.layers_path + "."):
            continue
        if key == "lm_head.weight" and hf_config.get("tie_word_embeddings", False):
            continue
        out.dense[key] = t.detach().to("cpu", src_dtype if t.is_floating_point() else t.dtype).clone()
    out.report["modules_not_converted"] = sorted(set(arch.not_convert) | set(cfg.modules_to_not_convert))
    return out


def _keep(result: LayerResult, i: int, out: QuantizeOutput, stored: dict[str, dict[str, int]] | None) -> None:
    """Add a finished layer to ``out``: its integers and prescaled weights in memory, or (``stored``)
    as references to its checkpoint file; dense tensors, search decisions, statistics in memory."""
    if stored is None:
        merge(result, out.linears, out.dense, out.prescaled, out.search)
    else:
        stored["q"].update(dict.fromkeys(result.linears, i))
        if out.prescaled is not None and result.prescaled is not None:
            stored["p"].update(dict.fromkeys(result.prescaled, i))
        merge(LayerResult({}, result.dense, None, result.scales, result.clips), {}, out.dense, None, out.search)
    if out.importance is not None:
        if result.importance is None:  # a checkpoint without statistics: the run has none
            out.importance = None
        else:
            for k, (v, c) in result.importance.items():
                out.importance.sums[k], out.importance.counts[k] = v, c


def _search_layer(
    layer: nn.Module,
    arch: ArchSpec,
    hf_config: dict[str, Any],
    cfg: QuantConfig,
    grid: Grid,
    chunks: ChunkStore,
    n_search_chunks: int,
    prefix: str,
    results: SearchResults,
    clip_all: bool = False,
    importance: ImportanceMatrix | None = None,
) -> tuple[ChunkStore, float]:
    """Scale and clip search for one fp32 layer on the device; returns the next layer's inputs."""
    mappings = resolve_layer(layer, arch, hf_config) if cfg.search_scales else []
    if not cfg.smooth_gqa_vo:  # the peers' behaviour: skip v->o unless shapes match (plain MHA)
        mappings = [m for m in mappings if not (m.spec.vo and _is_gqa(m))]
    paths = {m.spec.inspect for m in mappings if m.spec.inspect}
    paths |= {m.layers[0].name for m in mappings if m.spec.inspect is None and not m.layers[0].index}
    linear_only = {m.layers[0].name for m in mappings if m.spec.inspect is None and not m.layers[0].index}
    rec = ActivationRecorder(layer, sorted(paths), frozenset(linear_only))
    imp = ImportanceRecorder(layer, quantizable_slots(layer, arch, cfg.modules_to_not_convert))
    next_chunks = ChunkStore(chunks.device, chunks.budget)
    try:
        for ci, c in enumerate(chunks):
            rec.keep = ci < n_search_chunks
            y = run_module(layer, c.hidden, fit_kwargs(c.kwargs, c.hidden.shape[0]), as_kw=False)
            next_chunks.append(y, c.kwargs)
    finally:
        rec.remove()
        imp.remove()

    before = after = 0.0
    input_div: dict[str, Tensor] = {}
    routed: dict[str, Tensor] | None = None
    for m in mappings:
        lead = m.layers[0]
        if m.spec.inspect:
            r = rec.records[m.spec.inspect]
            x_mean, loss = r.x_mean, _block_loss(m.inspect, r.inputs, r.kwargs, r.as_kw)
        elif not lead.index:
            r = rec.records[lead.name]
            x_mean, loss = r.x_mean, _gram_loss(m.layers, r.gram, r.count)
        else:  # one fused expert: inputs are rebuilt from the routed tokens
            if routed is None:
                moe_path = lead.name.split(".experts.")[0]
                xr = rec.records.get(moe_path)
                if xr is None:
                    continue
                div = input_div.get(moe_path)
                x_moe = _flat(xr.inputs)
                routed = routed_inputs(_get(layer, moe_path), x_moe / div if div is not None else x_moe)
            x = routed.get(lead.name.split(".", 1)[1])
            if x is None:
                log.info("%s%s received no calibration tokens; not smoothed", prefix, lead.name)
                continue
            x_mean, loss = x.abs().mean(0), _linear_loss(m.layers, x)
        choice = search_scale(m, x_mean, loss, grid, cfg.group_size, cfg.n_grid, cfg.duo_scaling)
        apply_scale(m, choice.scales)
        imp.fold([s.name for s in m.layers + m.extra], input_scale(m, choice.scales))
        if m.spec.inspect:
            s_in = input_scale(m, choice.scales.to(x_mean.device))
            input_div[m.spec.inspect] = input_div.get(m.spec.inspect, 1.0) * s_in
        before += choice.loss_before
        after += choice.loss_after
        results.scales.append(
            ScaleRecord(
                prefix + m.prev.name,
                tuple(prefix + s.name for s in m.layers),
                choice.scales.to(torch.float32),
                choice.alpha,
                choice.loss_before,
                choice.loss_after,
            )
        )

    if importance is not None:
        imp.add_to(importance, prefix)
    if cfg.apply_clip:
        _clip_layer(layer, arch, cfg, grid, chunks if clip_all else chunks.head(n_search_chunks), prefix, results)
    return next_chunks, (after / before if before > 0 else 1.0)


def _clip_layer(
    layer: nn.Module, arch: ArchSpec, cfg: QuantConfig, grid: Grid, chunks: Iterable[Chunk], prefix: str,
    results: SearchResults
) -> None:
    slots = [s for s in quantizable_slots(layer, arch, cfg.modules_to_not_convert) if s.name not in arch.no_clip]
    names = sorted({s.name for s in slots if not s.index} | {s.name.split(".experts.")[0] for s in slots if s.index})
    inputs = sample_module_inputs(layer, chunks, names)
    routed_by_block: dict[str, dict[str, Tensor]] = {}
    for slot in slots:
        if slot.index:
            block = slot.name.split(".experts.")[0]
            if block not in routed_by_block and block in inputs:
                routed_by_block[block] = routed_inputs(_get(layer, block), inputs[block])
            x = routed_by_block.get(block, {}).get(slot.name[len(block) + 1 :])
        else:
            x = inputs.get(slot.name)
        if x is None or x.shape[0] == 0:
            continue
        x = subsample(x, cfg.clip_n_tokens)
        max_val = search_clip(
            slot.weight, x, grid, _clip_group(grid, slot.shape[1]), cfg.clip_n_grid, cfg.clip_max_shrink
        )
        apply_clip(slot, max_val)
        results.clips[prefix + slot.name] = max_val.cpu()


def _clip_group(grid: Grid, n_in: int) -> int:
    if hasattr(grid, "group_for"):
        return grid.group_for(n_in)  # type: ignore[attr-defined]
    return int(getattr(grid, "block_size", 32))


def _quantize_layer(
    layer: nn.Module, arch: ArchSpec, cfg: QuantConfig, grid: IntGrid, src_dtype: torch.dtype, prefix: str,
    found: SearchResults, keep_prescaled: bool
) -> LayerResult:
    res = LayerResult({}, {}, {} if keep_prescaled else None, found.scales, found.clips)
    slots = quantizable_slots(layer, arch, cfg.modules_to_not_convert)
    taken: set[int] = set()
    for slot in slots:
        w = slot.weight.to(torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise InputError(f"{prefix}{slot.name} has NaN/inf weights after scaling; report this as a bug")
        p = grid.pack(w, slot.bias)
        res.linears[prefix + slot.name] = p.to("cpu")
        if res.prescaled is not None:
            res.prescaled[prefix + slot.name] = w.to("cpu", grid.scale_dtype)
        taken.add(id(slot.param))
        if slot.bias is not None:
            taken.add(id(slot.bias))
    params = dict(layer.named_parameters())
    for name, t in layer.state_dict(keep_vars=True).items():
        if name in params and id(params[name]) in taken:
            continue
        res.dense[prefix + name] = t.detach().to("cpu", src_dtype if t.is_floating_point() else t.dtype).clone()
    return res


def search_first_order(n: int, k: int) -> Tensor:
    """A block order that puts ``k`` evenly spaced blocks first (the search subset), the rest after."""
    if k >= n:
        return torch.arange(n)
    pick = torch.linspace(0, n - 1, k).round().long().unique()
    rest = torch.ones(n, dtype=torch.bool)
    rest[pick] = False
    return torch.cat([pick, torch.arange(n)[rest]])


def _is_gqa(m: ResolvedMapping) -> bool:
    return m.kv_index is not None and not torch.equal(m.kv_index, torch.arange(len(m.kv_index)))


def _flat(xs: list[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _block_loss(module: nn.Module, xs: list[Tensor], kws: list[dict[str, Any]], as_kw: bool):
    refs = [run_module(module, x, kw, as_kw) for x, kw in zip(xs, kws)]
    numel = sum(r.numel() for r in refs)

    def loss() -> float:
        total = 0.0
        for x, kw, ref in zip(xs, kws, refs):
            total += float((run_module(module, x, kw, as_kw) - ref).float().pow(2).sum())
        return total / numel

    return loss


def _gram_loss(slots: list[LinearSlot], gram: Tensor, n_tokens: int):
    """Mean squared output error of the linears over every recorded token, from ``G = X^T X``:
    ``|X D^T|^2 = sum((D @ G) * D)`` for the weight change ``D`` from the float weights."""
    refs = [s.weight.clone() for s in slots]
    numel = n_tokens * sum(r.shape[0] for r in refs)

    def loss() -> float:
        total = 0.0
        for s, w0 in zip(slots, refs):
            d = s.weight - w0
            total += float(((d @ gram) * d).sum())
        return total / numel

    return loss


def _linear_loss(slots: list[LinearSlot], x: Tensor):
    refs = [x @ s.weight.T for s in slots]
    numel = sum(r.numel() for r in refs)

    def loss() -> float:
        return sum(float((x @ s.weight.T - r).pow(2).sum()) for s, r in zip(slots, refs)) / numel

    return loss
