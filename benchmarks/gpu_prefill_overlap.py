"""Long prefill: each linear's dequantisation hidden under the GEMM before it (one GPU).

Run BD showed that a dequantise kernel on a side stream gains nothing while cuBLAS runs: the GEMM's
persistent CTAs fill every SM. Here cuBLASLt is asked to leave ``c`` SMs free (torch's SM carveout,
CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET) and the next linear's weight is dequantised on those SMs, on a
low-priority stream, into a ring of fp16 buffers, while the GEMMs run on a high-priority stream.
Only the first linear's dequantisation of a chain stays exposed.

Per M, over L layers of Llama-2-7B weights (qkv -> o -> gate_up -> down, inputs fixed), eager, CUDA
events around the whole chain (each GEMM is 0.2-1 ms here, so launches do not matter), median of
``--reps``; per-layer microseconds:
  fp16          F.linear on fp16 weights (default cuBLAS backend): the baseline
  fp16_lt_cC    the same on cuBLASLt with c SMs carved out (what the GEMMs cost when they leave room)
  seq           ops.w4_matmul: dequantise, then matmul, in order (the package's path from M = 257)
  pipe_cC_bB    dequantise ahead on the side stream, c SMs carved out, a ring of B buffers
Every output is checked against the dense reference; pipe outputs are also compared bit for bit
with seq's where the carveout is 0 (same GEMM algorithm).
Usage: python benchmarks/gpu_prefill_overlap.py [--ms 1024,4096] [--carveouts 0,8,16,24,32]
       [--bufs 2,3] [--layers 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import DEV, SHAPES, make_set, rel_err, run_info

from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import dequantize, w4_matmul


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over reps (two warm-up calls first)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


class Carveout:
    """cuBLASLt with ``c`` SMs left free (c = 0: cuBLASLt, nothing carved out)."""

    def __init__(self, c: int):
        self.c = c

    def __enter__(self):
        self.lib = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(self.c or None)

    def __exit__(self, *exc):
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(self.lib)


def pipelined(xs, kws, n_bufs: int, bufs, hi: torch.cuda.Stream, lo: torch.cuda.Stream) -> list[torch.Tensor]:
    """y_i = x_i @ dequant(W_i) with W_{i+1..i+B-1} dequantised on ``lo`` while GEMM i runs on ``hi``."""
    n = len(kws)
    ready = [torch.cuda.Event() for _ in range(n)]
    used = [torch.cuda.Event() for _ in range(n)]
    cur = torch.cuda.current_stream()
    hi.wait_stream(cur)
    lo.wait_stream(cur)

    def dequant(j):
        with torch.cuda.stream(lo):
            if j >= n_bufs:
                lo.wait_event(used[j - n_bufs])  # the buffer's last reader is done
            k, nn = kws[j].in_features, kws[j].out_features
            buf = bufs[j % n_bufs][: k * nn].view(k, nn)
            dequantize(kws[j], torch.float16, out=buf)
            ready[j].record(lo)
            return buf

    ws = {}
    for j in range(min(n_bufs, n)):
        ws[j] = dequant(j)
    ys = []
    with torch.cuda.stream(hi):
        for i in range(n):
            hi.wait_event(ready[i])
            ys.append(torch.matmul(xs[i], ws.pop(i)))
            used[i].record(hi)
            if i + n_bufs < n:
                ws[i + n_bufs] = dequant(i + n_bufs)
    cur.wait_stream(hi)
    return ys


def run_m(M: int, a, sets: list[dict], kws: list[KernelWeight], hi, lo) -> list[dict]:
    """Every method at one M; rows of per-layer microseconds."""
    order = list(SHAPES.items())
    ws = [st["W"] for st in sets]
    biggest = max(K * N for K, N in SHAPES.values())
    xs_by_k = {K: torch.randn(M, K, dtype=torch.float16, device=DEV) for K, _ in SHAPES.values()}
    xs = [xs_by_k[K] for _ in range(a.layers) for _, (K, N) in order]
    methods = {"fp16": (None, lambda: [F.linear(x, w) for x, w in zip(xs, ws)]),
               "seq": (None, lambda: [w4_matmul(x, kw) for x, kw in zip(xs, kws)])}
    for c in a.carveouts:
        methods[f"fp16_lt_c{c}"] = (c, methods["fp16"][1])
        for B in a.bufs:
            bufs = [torch.empty(biggest, dtype=torch.float16, device=DEV) for _ in range(B)]
            methods[f"pipe_c{c}_b{B}"] = (c, lambda B=B, bufs=bufs: pipelined(xs, kws, B, bufs, hi, lo))
    rows, seq_out = [], None
    for name, (c, fn) in methods.items():
        try:
            with Carveout(c) if c is not None else contextlib.nullcontext():
                ys = fn()
                ms = timed(fn, a.reps)
            torch.cuda.synchronize()
            err = max(rel_err(y, x, st["W"]) for y, x, st in zip(ys, xs, sets))
            same = all(torch.equal(p, q) for p, q in zip(ys, seq_out)) if name.startswith("pipe") else None
            if name == "seq":
                seq_out = ys
        except Exception as e:  # noqa: BLE001 - report and go on with the other methods
            print(f"M={M} {name}: failed {e!r}"[:300], flush=True)
            continue
        row = {"M": M, "method": name, "layer_us": round(ms * 1e3 / a.layers, 1), "rel_err": float(f"{err:.2e}"),
               "equal_to_seq": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1024,4096", type=lambda v: [int(m) for m in v.split(",")])
    ap.add_argument("--carveouts", default="0,8,16,24,32", type=lambda v: [int(c) for c in v.split(",")])
    ap.add_argument("--bufs", default="2,3", type=lambda v: [int(b) for b in v.split(",")])
    ap.add_argument("--layers", default=3, type=int)
    ap.add_argument("--reps", default=7, type=int)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    torch.manual_seed(0)
    info = run_info()
    print(info, flush=True)
    sets = [make_set(K, N) for _ in range(a.layers) for K, N in SHAPES.values()]
    kws = [KernelWeight.from_packed(st["p"]) for st in sets]
    lo = torch.cuda.Stream(priority=0)  # lowest
    hi = torch.cuda.Stream(priority=-100)  # clamped to the highest the device has
    rows = []
    for M in a.ms:
        rows += run_m(M, a, sets, kws, hi, lo)
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "gpu_prefill_overlap.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print("\nper layer, us (x = fp16's time / this)")
    for M in a.ms:
        base = next(r["layer_us"] for r in rows if r["M"] == M and r["method"] == "fp16")
        for r in rows:
            if r["M"] == M:
                print(f"M={M:<5} {r['method']:<14} {r['layer_us']:9.1f}  ({base / r['layer_us']:.3f}x)")


if __name__ == "__main__":
    main()
