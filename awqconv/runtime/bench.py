"""``bench``: AutoAWQ's benchmark table for the built-in runtime (and optionally its fp16 path).

One row per (batch, prefill length, decode length): prefill tok/s (batch x prompt tokens over the
prefill time), decode tok/s (batch x generated tokens over the decode time; CUDA-graphed steps on a
GPU), and peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process's max RSS on the
CPU). Prompts are random token ids; greedy decoding runs exactly ``decode`` steps (no EOS).

Every length is checked before any work: each must be an integer >= 1, and every prefill + decode
must fit the model's context (``max_position_embeddings``); a bad value is a UsageError. A rate with
nothing to time (``decode`` 1 has no decode step) is None, shown as "n/a", never 0 or a huge number.
"""

from __future__ import annotations

import gc
import logging
import numbers
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import UsageError
from ..hfconfig import context_length
from .generate import Generator, SamplingParams, padded_prefill_len
from ..formats import read_artifact
from .model import build_decoder

log = logging.getLogger(__name__)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


# the CLI flag behind each bench() argument, so one message serves both
_FLAGS = {"batch_sizes": "--batch-size", "prefill_lens": "--prefill", "decode_lens": "--decode"}


def parse_lengths(text: str, flag: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``, or a UsageError naming ``flag`` and the valid range."""
    text = str(text)
    shown = text if text.strip() else repr(text)  # quote only what would not show: '' or '  '
    try:
        values = [int(x) for x in (x.strip() for x in text.split(",")) if x]
    except ValueError:
        raise UsageError(f"{flag} {shown} is not a comma-separated list of integers; "
                         f"give lengths >= 1, e.g. {flag} 64,512") from None
    return _check_lengths(values, flag, shown=shown)


def _check_lengths(values: Any, flag: str, shown: str | None = None) -> list[int]:
    """The lengths as a list of ints, each >= 1; a UsageError naming ``flag`` otherwise."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = [values]  # bench(path, batch_sizes=4) means one row of batch 4
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise UsageError(f"{flag} {values!r}: give a list of integers >= 1")
    shown = shown or repr(list(values))
    if not values:
        raise UsageError(f"{flag} {shown}: give at least one length (each an integer >= 1)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise UsageError(f"{flag} {shown}: {v!r} is not an integer; each length must be an integer >= 1")
        if v < 1:
            raise UsageError(f"{flag} {shown}: {v} is out of range; each length must be an integer >= 1")
    return [int(v) for v in values]


def _check_context(prefill_lens: list[int], decode_lens: list[int], context: int | None) -> None:
    """Every (prefill, decode) row must fit the context: checked for all rows before the first runs."""
    if context is None:
        return
    p, d = max(((p, d) for p in prefill_lens for d in decode_lens), key=sum)
    if p + d > context:
        raise UsageError(f"--prefill {p} + --decode {d} = {p + d} tokens does not fit the model's context "
                         f"length of {context} (max_position_embeddings); keep prefill + decode <= {context}")


def _cache_len(prefill: int, decode: int, context: int | None) -> int:
    """Cache slots for one row: room for a graphed prefill's left padding (``padded_prefill_len``) and
    the slot the decode graphs are captured on, but never past the context; when the padding would
    cross it, ``Generator.prefill_slots`` falls back to an unpadded prefill in ``prefill + decode``."""
    want = padded_prefill_len(prefill) + decode + 1
    if context is None:
        return want
    return max(prefill + decode, min(want, context))


def _rate(tokens: int, seconds: float) -> float | None:
    """tokens / seconds, or None where there is nothing to time (never 0, negative or ~1e9)."""
    if tokens <= 0 or not seconds > 0:
        return None
    return tokens / seconds


def _bench_one(dec, batch: int, prefill: int, decode: int, device: torch.device, seed: int,
               context: int | None = None) -> dict[str, Any]:
    gen = Generator(dec, max_batch=batch, max_len=_cache_len(prefill, decode, context))
    g = torch.Generator().manual_seed(seed)
    vocab = dec.spec.vocab
    prompts = [torch.randint(0, vocab, (prefill,), generator=g).tolist() for _ in range(batch)]
    gen.generate(prompts, SamplingParams(max_new_tokens=min(decode, 4)))  # warm-up: compile, graph capture
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    r = gen.generate(prompts, SamplingParams(max_new_tokens=decode))
    return {"batch": batch, "prefill": prefill, "decode": decode,
            "prefill_tok_s": _rate(batch * prefill, r.prefill_s),
            "decode_tok_s": _rate(batch * r.decode_steps, r.decode_s),
            "memory_gb": _peak_mem_gb(device)}


def bench(path: str | Path, batch_sizes: Sequence[int] = (1,), prefill_lens: Sequence[int] = (64,),
          decode_lens: Sequence[int] = (64,), compare_fp16: bool = False,
          device: str | torch.device | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{model, batch, prefill, decode, prefill_tok_s, decode_tok_s, memory_gb}``.

    ``compare_fp16`` adds the same runtime with dequantised float weights (the scales' dtype on a
    GPU, fp32 on the CPU) as the baseline rows (``model = "fp16"``). Each length must be an integer
    >= 1 and each prefill + decode must fit the model's context, or UsageError before any row runs;
    a rate is None where there is nothing to time (``decode_tok_s`` when decode is 1)."""
    device = resolve_device(device)
    batch_sizes = _check_lengths(batch_sizes, _FLAGS["batch_sizes"])
    prefill_lens = _check_lengths(prefill_lens, _FLAGS["prefill_lens"])
    decode_lens = _check_lengths(decode_lens, _FLAGS["decode_lens"])
    qm, fmt = read_artifact(path)
    context = context_length(qm.hf_config)
    _check_context(prefill_lens, decode_lens, context)
    rows: list[dict[str, Any]] = []
    modes = [("int4", "auto")] + ([("fp16", "dense")] if compare_fp16 else [])
    for label, mode in modes:
        dec = build_decoder(qm, device, mode=mode)
        for b in batch_sizes:
            for p in prefill_lens:
                for d in decode_lens:
                    row = {"model": label, "format": fmt, **_bench_one(dec, b, p, d, device, seed, context)}
                    log.info("bench %s", row)
                    rows.append(row)
        del dec
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The AutoAWQ-style table as text."""
    head = ["Model", "Batch Size", "Prefill Length", "Decode Length", "Prefill tokens/s", "Decode tokens/s", "Memory (GB)"]
    rate = lambda v: "n/a" if v is None else f"{v:.1f}"
    body = [[r["model"], r["batch"], r["prefill"], r["decode"], rate(r["prefill_tok_s"]),
             rate(r["decode_tok_s"]), f"{r['memory_gb']:.2f}"] for r in rows]
    w = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(str(c).rjust(n) for c, n in zip(cells, w)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(line, body)])
