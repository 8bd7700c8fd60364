"""``bench``: AutoAWQ's benchmark table for the built-in runtime (and optionally its fp16 path).

One row per (batch, prefill length, decode length): prefill tok/s (batch x prompt tokens over the
prefill time), decode tok/s (batch x generated tokens over the decode time; CUDA-graphed steps on a
GPU), and peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the process's max RSS on the
CPU). Prompts are random token ids; greedy decoding runs exactly ``decode`` steps (no EOS).
"""

from __future__ import annotations

import gc
import logging
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .generate import Generator, SamplingParams, padded_prefill_len
from .lm import load_quantized
from .model import build_decoder

log = logging.getLogger(__name__)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def _bench_one(dec, batch: int, prefill: int, decode: int, device: torch.device, seed: int) -> dict[str, Any]:
    # room for a graphed prefill's left padding too
    gen = Generator(dec, max_batch=batch, max_len=padded_prefill_len(prefill) + decode + 1)
    g = torch.Generator().manual_seed(seed)
    vocab = dec.spec.vocab
    prompts = [torch.randint(0, vocab, (prefill,), generator=g).tolist() for _ in range(batch)]
    gen.generate(prompts, SamplingParams(max_new_tokens=min(decode, 4)))  # warm-up: compile, graph capture
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    r = gen.generate(prompts, SamplingParams(max_new_tokens=decode))
    return {"batch": batch, "prefill": prefill, "decode": decode,
            "prefill_tok_s": batch * prefill / max(r.prefill_s, 1e-9),
            "decode_tok_s": batch * r.decode_steps / max(r.decode_s, 1e-9),
            "memory_gb": _peak_mem_gb(device)}


def bench(path: str | Path, batch_sizes: Sequence[int] = (1,), prefill_lens: Sequence[int] = (64,),
          decode_lens: Sequence[int] = (64,), compare_fp16: bool = False,
          device: str | torch.device | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``{model, batch, prefill, decode, prefill_tok_s, decode_tok_s, memory_gb}``.

    ``compare_fp16`` adds the same runtime with dequantised float weights (the scales' dtype on a
    GPU, fp32 on the CPU) as the baseline rows (``model = "fp16"``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    qm, fmt = load_quantized(path)
    rows: list[dict[str, Any]] = []
    modes = [("int4", "auto")] + ([("fp16", "dense")] if compare_fp16 else [])
    for label, mode in modes:
        dec = build_decoder(qm, device, mode=mode)
        for b in batch_sizes:
            for p in prefill_lens:
                for d in decode_lens:
                    row = {"model": label, "format": fmt, **_bench_one(dec, b, p, d, device, seed)}
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
    body = [[r["model"], r["batch"], r["prefill"], r["decode"], f"{r['prefill_tok_s']:.1f}",
             f"{r['decode_tok_s']:.1f}", f"{r['memory_gb']:.2f}"] for r in rows]
    w = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(str(c).rjust(n) for c, n in zip(cells, w)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|", *map(line, body)])
