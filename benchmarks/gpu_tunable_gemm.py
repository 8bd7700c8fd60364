"""Long prefill: does a tuned fp16 GEMM make dequantise + GEMM at least as fast as the default fp16
cuBLAS call (the M = 4096 goal)? An experiment (notes/gpu_notes.md, run BB).

bf16 cuBLAS ran ~5 % faster than fp16 cuBLAS at M = 4096 in run AV, so the fp16 heuristic may not
pick the fastest kernel here. Per Llama-2-7B shape at M = 4096, one run: the default F.linear
(the fp16 baseline, "TN") and x @ W[K, N] ("NN", our dequantised path), then the same GEMMs with
PyTorch TunableOp enabled (it times the cuBLASLt candidates for each shape once and keeps the
fastest), and dequantise + tuned NN per layer against the untuned baseline. Timing: median of
triton's do_bench on one weight (compute-bound here, L2 irrelevant).

  python benchmarks/gpu_tunable_gemm.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import SHAPES, make_set

from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import dequantize

M = 4096


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    data = {}
    for shape, (K, N) in SHAPES.items():
        st = make_set(K, N)
        kw = KernelWeight.from_packed(st["p"])
        x = torch.randn(M, K, dtype=torch.float16, device="cuda")
        wt = st["W"].contiguous()  # [N, K]
        w = wt.t().contiguous()  # [K, N]
        buf = torch.empty(K, N, dtype=torch.float16, device="cuda")
        data[shape] = (x, wt, w, kw, buf)
    rows = {}
    for shape, (x, wt, w, kw, buf) in data.items():
        rows[shape] = {"tn": bench(lambda x=x, wt=wt: F.linear(x, wt)), "nn": bench(lambda x=x, w=w: x @ w),
                       "dequant_nn": bench(lambda x=x, kw=kw, buf=buf: x @ dequantize(kw, torch.float16, out=buf))}
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)
    torch.cuda.tunable.set_max_tuning_duration(200)
    torch.cuda.tunable.set_filename(os.path.join(a.out, "tunableop_results.csv"))
    for shape, (x, wt, w, kw, buf) in data.items():
        ref = (x @ w).float()
        F.linear(x, wt)
        y = x @ w  # tunes
        torch.cuda.synchronize()
        r = rows[shape]
        r["tuned_max_abs_diff"] = (y.float() - ref).abs().max().item()
        r["tn_tuned"] = bench(lambda x=x, wt=wt: F.linear(x, wt))
        r["nn_tuned"] = bench(lambda x=x, w=w: x @ w)
        r["dequant_nn_tuned"] = bench(lambda x=x, kw=kw, buf=buf: x @ dequantize(kw, torch.float16, out=buf))
        print(shape, json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    layer = {k: round(sum(r[k] for r in rows.values()), 1) for k in
             ("tn", "nn", "dequant_nn", "tn_tuned", "nn_tuned", "dequant_nn_tuned")}
    layer["ratio_dequant_tuned_vs_tn"] = round(layer["tn"] / layer["dequant_nn_tuned"], 3)
    layer["ratio_dequant_vs_tn"] = round(layer["tn"] / layer["dequant_nn"], 3)
    print(json.dumps(layer, indent=1))
    try:
        results = torch.cuda.tunable.get_results()
    except Exception as e:  # noqa: BLE001
        results = str(e)
    with open(os.path.join(a.out, "gpu_tunable_gemm.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "per_layer_us": layer, "tunable_results": str(results)[:4000]}, f,
                  indent=1)


if __name__ == "__main__":
    main()
