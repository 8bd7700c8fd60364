"""What does the split-K merge cost the small-batch tensor-core tile (kernels/tile_t.py)?

For M in {4, 16} and the four Llama-2-7B shapes, under the protocol of gpu_kernels.py (CUDA-graph
replays over >= 400 MB of distinct weights, median), time with the default config:
  tile_t           - the real kernel: every program parks its fp32 partial, takes a ticket
                     (fence + atomic round trip) and the last one of a tile sums the partials;
  tile_t_partials  - the same loop, each program stores its partial and exits (no ticket, no sum):
                     the kernel without its merge;
  tile_t_2k        - those partials summed by a second, PDL-launched merge kernel (same order, so
                     the same bits as tile_t; checked).
Usage: python benchmarks/gpu_split_merge.py [--ms 4,16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import SHAPES, G, time_graph

from awqconv.kernels.launch import pdl_launch, pdl_start, pdl_wait
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import default_config, plan_matmul
from awqconv.kernels.tile_t import tile_t_slice
from awqconv.packed import PackedLinear

DEV = torch.device("cuda")


@triton.jit
def tile_t_partials_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                           M, N, K, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, GROUP: tl.constexpr,
                           SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr = 4,
                           DOT_F32: tl.constexpr = False, USE_ASM: tl.constexpr = True,
                           USE_PDL: tl.constexpr = False):
    """w4_tile_t_kernel's loop (same arguments); the partial [BM, BN] is stored and the program exits."""
    pdl_start(USE_PDL)
    acc, pid_k, rm, rn = tile_t_slice(x_ptr, qw_ptr, s_ptr, z_ptr, M, N, K, K_SPLIT, stride_xm, BLOCK_M, BLOCK_N, KC,
                                      GROUP, PREFETCH, DOT_F32, USE_ASM, USE_PDL)
    tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def merge_rows_kernel(ws_ptr, y_ptr, M, N, SPLIT, stride_ym, SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """y[m, n] = sum over splits of the parked partials, in split order, rounded once."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tot = tl.zeros((BLOCK,), dtype=tl.float32)
    for kk in tl.static_range(SPLIT_P2):
        tot += tl.load(ws_ptr + kk * M * N + m * N + rn, mask=(rn < N) & (rn * 0 + kk < SPLIT), other=0.0)
    tl.store(y_ptr + m * stride_ym + rn, tot.to(y_ptr.dtype.element_ty), mask=rn < N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="4,16", type=lambda v: [int(m) for m in v.split(",")])
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rows": []}
    for name, (K, N) in SHAPES.items():
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        kws = []
        for _ in range(R):
            p = PackedLinear(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=DEV),
                             (torch.rand(N, K // G, device=DEV) * 0.01 + 0.001).half(),
                             torch.randint(0, 16, (N, K // G), dtype=torch.uint8, device=DEV), K, G)
            kws.append(KernelWeight.from_packed(p))
        for M in a.ms:
            x = torch.randn(M, K, dtype=torch.float16, device=DEV)
            cfg = default_config(M, kws[0], DEV)
            plans = [plan_matmul(x, kw, cfg) for kw in kws]
            split = plans[0].grid[2]

            def real():
                for pl in plans:
                    pl()

            def partials():
                for pl in plans:
                    tile_t_partials_kernel[pl.grid](*pl.args, **pl.meta)

            def two_kernels():
                for pl in plans:
                    tile_t_partials_kernel[pl.grid](*pl.args, **pl.meta)
                    merge_rows_kernel[(triton.cdiv(N, 256), M)](pl.args[6], pl.y, M, N, split, pl.y.stride(0),
                                                                SPLIT_P2=triton.next_power_of_2(split), BLOCK=256,
                                                                num_warps=4, **pdl_launch(DEV))

            row = {"shape": name, "M": M, "split": split, "programs": math.prod(plans[0].grid)}
            if split > 1:
                two_kernels()
                y2 = plans[-1].y.clone()
                row["two_kernels_equal"] = bool(torch.equal(y2, plans[-1]()))
            for label, fn in (("tile_t", real), ("tile_t_partials", partials), ("tile_t_2k", two_kernels)):
                if split == 1 and label != "tile_t":
                    continue
                row[label + "_us"] = round(time_graph(fn, R)[0], 2)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        del kws
        torch.cuda.empty_cache()
    for M in a.ms:
        rows = [r for r in out["rows"] if r["M"] == M]
        print(f"M={M} one layer, us:", {k: round(sum(r.get(k, r["tile_t_us"]) for r in rows), 1)
                                         for k in ("tile_t_us", "tile_t_partials_us", "tile_t_2k_us")})
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_split_merge.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
