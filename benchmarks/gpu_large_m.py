"""Long prefill (M >= 1024) on one GPU: where dequantise + cuBLAS loses its time to fp16 cuBLAS.

Per Llama-2-7B linear shape and M, in one run and the protocol of gpu_kernels.py (CUDA-graph
replays over distinct weights):
  fp16_tn      F.linear(x, W[N, K])         the fp16 baseline (cuBLAS "TN")
  fp16_nn      x @ W[K, N]                  the GEMM our dequantised path runs
  dequant      the dequantise kernel alone (W[K, N] fp16 out)
  awq_default  dequantise + x @ W           (what ops.w4_matmul runs from M = 257)
  awq_slabS    the weight in S column slabs, each dequantised into one reused buffer small enough to
               stay in L2, then multiplied into its columns of y (cuBLAS writes the strided slice)
Usage: python benchmarks/gpu_large_m.py [--ms 1024,4096] [--slabs 2,4,8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import DEV, SHAPES, make_set, rel_err, run_info, time_graph  # noqa: E402

from awqconv.kernels.layout import KernelWeight  # noqa: E402
from awqconv.kernels.ops import dequantize, w4_matmul  # noqa: E402
from awqconv.packed import PackedLinear  # noqa: E402


def slabs_of(p: PackedLinear, S: int) -> list[KernelWeight]:
    """The weight as S kernel-layout weights of N / S columns each."""
    n = p.out_features // S
    return [KernelWeight.from_packed(PackedLinear(p.qweight[i * n:(i + 1) * n], p.scales[i * n:(i + 1) * n],
                                                  p.zeros[i * n:(i + 1) * n], p.in_features, p.group_size))
            for i in range(S)]


def slab_matmul(x: torch.Tensor, slabs: list[KernelWeight], buf: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = slabs[0].out_features
    for i, kw in enumerate(slabs):
        dequantize(kw, x.dtype, out=buf)
        torch.mm(x, buf, out=y[:, i * n:(i + 1) * n])
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1024,4096", type=lambda v: [int(m) for m in v.split(",")])
    ap.add_argument("--slabs", default="2,4,8", type=lambda v: [int(s) for s in v.split(",")])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    torch.manual_seed(0)
    info = run_info()
    print(info, flush=True)
    rows = []
    for shape, (K, N) in SHAPES.items():
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        sets = [make_set(K, N) for _ in range(R)]
        kws = [KernelWeight.from_packed(st["p"]) for st in sets]
        w_kn = [st["W"].t().contiguous() for st in sets]
        for M in a.ms:
            x = torch.randn(M, K, dtype=torch.float16, device=DEV)
            buf_full = torch.empty(K, N, dtype=torch.float16, device=DEV)
            methods = {
                "fp16_tn": lambda i: F.linear(x, sets[i]["W"]),
                "fp16_nn": lambda i: x @ w_kn[i],
                "dequant": lambda i: dequantize(kws[i], torch.float16, out=buf_full),
                "awq_default": lambda i: w4_matmul(x, kws[i]),
            }
            for S in a.slabs:
                if N % (S * 64):
                    continue
                sl = [slabs_of(st["p"], S) for st in sets]
                buf = torch.empty(K, N // S, dtype=torch.float16, device=DEV)
                y = torch.empty(M, N, dtype=torch.float16, device=DEV)
                methods[f"awq_slab{S}"] = lambda i, sl=sl, buf=buf, y=y: slab_matmul(x, sl[i], buf, y)
            for name, fn in methods.items():
                if name != "dequant":
                    out = fn(0)
                    err = rel_err(out, x, sets[0]["W"])
                    if err > 1e-2:
                        print(f"{shape} M={M} {name}: rel_err {err:.2e}, not timed", flush=True)
                        continue
                us = time_graph(lambda: [fn(i) for i in range(R)], R)[0]
                row = dict(shape=shape, M=M, method=name, us=round(us, 1),
                           TFLOPs=round(2 * M * K * N / us / 1e6, 1) if name != "dequant" else None)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del sets, kws, w_kn
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "gpu_large_m.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print("\none layer's four linears, us (x = fp16_tn's time / this)")
    for M in a.ms:
        tn = sum(r["us"] for r in rows if r["M"] == M and r["method"] == "fp16_tn")
        for name in dict.fromkeys(r["method"] for r in rows if r["M"] == M):
            t = [r["us"] for r in rows if r["M"] == M and r["method"] == name]
            if len(t) == len(SHAPES):
                print(f"M={M:<5} {name:<12} {sum(t):9.1f}  ({tn / sum(t):.3f}x)")


if __name__ == "__main__":
    main()
