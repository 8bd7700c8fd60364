"""Sampling one token per row on the GPU: the one-kernel nucleus sampler (kernels/sample.py) beside
the sort-based torch path it replaced in the runtime (runtime/generate.py ``_sample_torch``).

Checks first: on an 8-token vocabulary, 200 000 rows per setting must reproduce the nucleus
distribution (nothing outside it; each frequency within 4.5 binomial standard deviations). Then
times both paths as the runtime calls them (eager, per step: seeds + kernel, or the torch ops),
CUDA events over 300 calls after a warm-up, for Llama-2 (32 000) and Llama-3 (128 256) vocabularies,
batch 1 and 8, logits ~ N(0, sigma^2) with sigma 2 (flat) and 6 (peaked); and top-k 50 / top-p 0.9
(torch on the 50 most probable tokens) against the full-vocabulary sort it replaced.

  python benchmarks/gpu_sampling.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.sample import nucleus_probs, nucleus_sample
from awqconv.runtime.generate import SamplingParams, _sample, _sample_torch


def check(dev) -> list[dict]:
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 0.0], device=dev)
    rows = []
    for t, top_p in [(1.0, 1.0), (1.0, 0.7), (2.0, 0.8), (0.5, 0.5)]:
        want = nucleus_probs(logits, t, top_p)
        n = 200_000
        seeds = torch.randint(0, 2**31 - 1, (n,), device=dev)
        freq = torch.bincount(nucleus_sample(logits.expand(n, 8), t, top_p, seeds), minlength=8).float().cpu() / n
        ok = bool((freq[want == 0] == 0).all() and ((freq - want).abs() <= 4.5 * (want * (1 - want) / n).sqrt()
                                                    + 1e-4).all())
        rows.append({"temperature": t, "top_p": top_p, "max_abs_dev": (freq - want).abs().max().item(), "ok": ok})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _top_k_full_sort(logits, p, gen):
    """The top-k path before run BC, for comparison: mask below the k-th, softmax and sort the vocabulary."""
    lg = logits.float() / p.temperature
    kth = torch.topk(lg, p.top_k, dim=-1).values[:, -1:]
    probs = lg.masked_fill(lg < kth, float("-inf")).softmax(-1)
    srt, idx = torch.sort(probs, descending=True, dim=-1)
    srt = srt.masked_fill(srt.cumsum(-1) - srt > p.top_p, 0.0)
    return idx.gather(-1, torch.multinomial(srt, 1, generator=gen)).squeeze(-1)


def time_call(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def time_graphed(fn, n: int = 20, reps: int = 10) -> float:
    """GPU time per call: ``n`` calls captured in one CUDA graph, replayed ``reps`` times."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / (n * reps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--variants", action="store_true", help="also time the kernel alone over block sizes and warps")
    a = ap.parse_args()
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    checks = check(dev)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for V in (32000, 128256):
        for B in (1, 8):
            for sigma in (2.0, 6.0):
                logits = (torch.randn(B, V, device=dev) * sigma).half()
                for t, top_p in [(0.7, 0.9), (0.7, 1.0)]:
                    p = SamplingParams(temperature=t, top_p=top_p)
                    kern = time_call(lambda lg=logits, p=p: _sample(lg, p, gen))
                    srt = time_call(lambda lg=logits, p=p: _sample_torch(lg, p, gen))
                    rows.append({"V": V, "B": B, "sigma": sigma, "temperature": t, "top_p": top_p,
                                 "kernel_us": round(kern, 1), "sorted_us": round(srt, 1),
                                 "speedup": round(srt / kern, 2)})
                    if a.variants:  # GPU time of the kernel alone (seeds drawn once, graph replays), block x warps
                        seeds = torch.randint(0, 2**31 - 1, (B,), device=dev)
                        for blk, w in [(4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32)]:
                            blk = min(blk, triton.next_power_of_2(V))
                            rows[-1][f"k_{blk}_w{w}_us"] = round(time_graphed(
                                lambda lg=logits, t=t, tp=top_p, sd=seeds, blk=blk, w=w: nucleus_sample(
                                    lg, t, tp, sd, block=blk, num_warps=w)), 1)
                    print(json.dumps(rows[-1]), flush=True)
                pk = SamplingParams(temperature=0.7, top_k=50, top_p=0.9)
                rows.append({"V": V, "B": B, "sigma": sigma, "top_k": 50, "top_p": 0.9,
                             "top_k_us": round(time_call(lambda lg=logits, pk=pk: _sample(lg, pk, gen)), 1),
                             "top_k_full_sort_us": round(time_call(
                                 lambda lg=logits, pk=pk: _top_k_full_sort(lg, pk, gen)), 1)})
                print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(a.out, "gpu_sampling.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
