"""The decode step's lm_head (fp16 [32000, 4096], one row): cuBLAS against a Triton GEMV (an experiment).

In the 7B decode step the vocabulary projection is one cuBLAS GEMV of 262 MB, ~98 us at ~2.7 TB/s
(4 % of a step at 2048 context) against the runtime's Triton GEMV (kernels/dense_gemv.py) over a
sweep of its tiles (rows x columns x warps). Protocol of gpu_kernels.py (a CUDA graph over enough distinct weights to defeat L2,
median), us per call, the read rate, and max |dy| against fp32 math.
Usage: python benchmarks/gpu_lm_head.py
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import time_graph

from awqconv.kernels.dense_gemv import dense_gemv_kernel

DEV = torch.device("cuda")
V, D = 32000, 4096


def main() -> None:
    torch.manual_seed(0)
    R = max(2, math.ceil(1.2e9 / (V * D * 2)))
    ws = [torch.randn(V, D, dtype=torch.float16, device=DEV) * 0.02 for _ in range(R)]
    x = torch.randn(1, D, dtype=torch.float16, device=DEV)
    ref = (x.float() @ ws[0].float().t())[0]
    out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "shape": [V, D], "rows": []}

    def report(name, fn, y):
        us = time_graph(fn, R)[0]
        row = {"method": name, "us": round(us, 2), "TBps": round(V * D * 2 / (us * 1e-6) / 1e12, 2),
               "max_abs_dy": float(f"{(y.float().reshape(-1) - ref).abs().max().item():.3g}")}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)

    report("cublas_f_linear", lambda: [F.linear(x, w) for w in ws], F.linear(x, ws[0]))
    y = torch.empty(V, dtype=torch.float16, device=DEV)
    for bn, bk, warps in ((8, 512, 4), (4, 1024, 4), (16, 256, 4), (16, 512, 8), (2, 2048, 4), (32, 256, 8),
                          (8, 1024, 8), (4, 512, 2)):
        def run(bn=bn, bk=bk, warps=warps, of=ws):
            for w in of:
                dense_gemv_kernel[(triton.cdiv(V, bn),)](x, w, y, V, D, w.stride(0), BLOCK_N=bn, BLOCK_K=bk,
                                                          num_warps=warps)
        run(of=ws[:1])
        report(f"triton_bn{bn}_bk{bk}_w{warps}", run, y.clone())
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_lm_head.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
