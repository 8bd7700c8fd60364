"""What does the split-K merge cost the small-batch tensor-core tile (kernels/tile_t.py)?

For M in {4, 16} and the four Llama-2-7B shapes, under the protocol of gpu_kernels.py (CUDA-graph
replays over >= 400 MB of distinct weights, median), time with the default config:
  tile_t           - the default: every program parks its fp32 partial and exits; a second,
                     PDL-launched kernel (w4_merge_kernel) sums them in split order;
  tile_t_ticket    - the merge in the kernel (the default before run BJ): every program parks its
                     partial, fences, takes a ticket, and the last one of a tile sums (same bits);
  tile_t_partials  - the loop alone: partials stored, no merge at all (output incomplete).
Usage: python benchmarks/gpu_split_merge.py [--ms 4,16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_kernels import SHAPES, distinct_kernel_weights, time_graph

from awqconv.kernels.launch import pdl_start
from awqconv.kernels.ops import default_config, plan_matmul
from awqconv.kernels.tile_t import tile_t_slice

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="4,16", type=lambda v: [int(m) for m in v.split(",")])
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "rows": []}
    for name, (K, N) in SHAPES.items():
        kws = distinct_kernel_weights(K, N)
        R = len(kws)
        for M in a.ms:
            x = torch.randn(M, K, dtype=torch.float16, device=DEV)
            cfg = default_config(M, kws[0], DEV)
            plans = [plan_matmul(x, kw, cfg) for kw in kws]  # default: parked partials + w4_merge_kernel
            tickets = [plan_matmul(x, kw, replace(cfg, park=False)) for kw in kws]
            split = plans[0].grid[2]

            def default():
                for pl in plans:
                    pl()

            def ticket():
                for pl in tickets:
                    pl()

            def partials():
                for pl in tickets:
                    tile_t_partials_kernel[pl.grid](*pl.args, **pl.meta)

            row = {"shape": name, "M": M, "split": split, "programs": math.prod(plans[0].grid)}
            if split > 1:
                row["merges_equal"] = bool(torch.equal(plans[-1]().clone(), tickets[-1]()))
            for label, fn in (("tile_t", default), ("tile_t_ticket", ticket), ("tile_t_partials", partials)):
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
                                         for k in ("tile_t_us", "tile_t_ticket_us", "tile_t_partials_us")})
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_split_merge.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
