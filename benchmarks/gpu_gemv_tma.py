"""The one-row GEMV with its words brought in by the tensor-memory accelerator (an experiment).

The default one-row GEMV (triton_w4.py) keeps one chunk of words in flight per program through
registers; a Triton pipeline of TMA copies (host tensor descriptors, ``tl.range(num_stages)``) keeps
STAGES - 1 chunks in flight through shared memory for one copy instruction per chunk, no registers
and no per-thread cp.async. Scales come by TMA too or as the default's row-broadcast tiles (SZ_TMA);
zeros and activations as in the default. Both kernels here store their split-K partial sums and
exit (no merge: ``gemv_partials`` of gpu_read_floor.py), so the two differ only in how they read.
Protocol of gpu_kernels.py (CUDA-graph replays over >= 400 MB of distinct weights, median), per
Llama-2-7B shape, us and the sum over one layer's four linears; the partials are checked bit-equal.
Usage: python benchmarks/gpu_gemv_tma.py
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.launch import pdl_launch, pdl_start, pdl_wait  # noqa: E402
from awqconv.kernels.ops import one_wave_split  # noqa: E402
from awqconv.kernels.triton_w4 import _gemv_f16x2_chunk, _gemv_f16x2_load_x, gemv_f16x2_slice  # noqa: E402
from gpu_kernels import SHAPES, G, distinct_kernel_weights, time_graph  # noqa: E402

DEV = torch.device("cuda")
BN, KC = 64, 64


@triton.jit
def partials_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ws_ptr, N, K, G, K_SPLIT,
                    BLOCK_N: tl.constexpr, KC: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The default GEMV's loop (register prefetch, PDL) storing its partial sums."""
    pdl_start(USE_PDL)
    acc, _, pid_k, rn = gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N, KC, 1, True, USE_PDL,
                                         False)
    tl.store(ws_ptr + pid_k * N + rn, acc, mask=rn < N)


@triton.jit
def tma_partials_kernel(x_ptr, w_desc, s_desc, s_ptr, z_ptr, ws_ptr, N, K, G, K_SPLIT,
                        BLOCK_N: tl.constexpr, KC: tl.constexpr, STAGES: tl.constexpr, SZ_TMA: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    """The same sums with the words (and with SZ_TMA the scales) copied by TMA through a
    STAGES-deep shared-memory pipeline."""
    pdl_start(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    rn = n0 + tl.arange(0, BLOCK_N)
    mn = rn < N
    rw = tl.arange(0, KC // 8)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    acc2 = tl.zeros((KC // 8, BLOCK_N), dtype=tl.float32)
    pdl_wait(USE_PDL)
    for k0 in tl.range(k_lo, k_hi, KC, num_stages=STAGES):
        w = w_desc.load([k0 // 8, n0])  # [KC/8, BN]
        sz = (k0 // G) * N + rn[None, :] + rw[:, None] * 0
        if SZ_TMA:
            s = tl.broadcast_to(s_desc.load([k0 // G, n0]), (KC // 8, BLOCK_N))
        else:
            s = tl.load(s_ptr + sz, mask=mn[None, :], other=0.0)
        z = tl.load(z_ptr + sz, mask=mn[None, :], other=0).to(tl.int32)
        x0, x1, x2, x3 = _gemv_f16x2_load_x(xw_ptr, k0, rw, tl.float16, True)
        acc2 += _gemv_f16x2_chunk(w, x0, x1, x2, x3, s, z, True)
    tl.store(ws_ptr + pid_k * N + rn, 64.0 * tl.sum(acc2, axis=0), mask=mn)


def main() -> None:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))
    out = {"device": torch.cuda.get_device_name(0), "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    variants = [(st, sz, per_sm, mr) for st in (2, 3, 4) for sz in (False, True) for per_sm, mr in ((16, 64), (8, None))]
    variants += [(6, False, 8, None), (3, False, 12, 80)]
    for name, (K, N) in SHAPES.items():
        kws = distinct_kernel_weights(K, N)
        R = len(kws)
        descs = [(TensorDescriptor(kw.qw, [K // 8, N], [N, 1], [KC // 8, BN]),
                  TensorDescriptor(kw.scales, [K // G, N], [N, 1], [1, BN])) for kw in kws]
        x = torch.randn(1, K, dtype=torch.float16, device=DEV)
        n_t = triton.cdiv(N, BN)
        row = {"shape": name}

        def grid_of(per_sm: int):
            split = one_wave_split(N, BN, per_sm, DEV)
            k_split = triton.cdiv(K // KC, split) * KC
            return (n_t, 1, triton.cdiv(K, k_split)), k_split

        (g0, k0) = grid_of(16)
        ref = torch.empty(g0[2] * N, dtype=torch.float32, device=DEV)

        def default(part=ref):
            for kw in kws:
                partials_kernel[g0](x, kw.qw, kw.scales, kw.zeros, part, N, K, G, k0, BLOCK_N=BN, KC=KC,
                                    num_warps=2, maxnreg=64, **pdl_launch(DEV))
        default()
        want = ref.clone()
        row["default_us"] = round(time_graph(default, R)[0], 2)
        for st, sz, per_sm, mr in variants:
            grid, k_split = grid_of(per_sm)
            part = torch.empty(grid[2] * N, dtype=torch.float32, device=DEV)
            extra = {"maxnreg": mr} if mr else {}

            def tma(part=part, grid=grid, k_split=k_split, st=st, sz=sz, extra=extra):
                for kw, (wd, sd) in zip(kws, descs):
                    tma_partials_kernel[grid](x, wd, sd, kw.scales, kw.zeros, part, N, K, G, k_split, BLOCK_N=BN,
                                              KC=KC, STAGES=st, SZ_TMA=sz, num_warps=2, **extra, **pdl_launch(DEV))
            label = f"tma_s{st}_{'sztma' if sz else 'szld'}_p{per_sm}_mr{mr}"
            try:
                tma()
                same = bool(torch.equal(part, want)) if grid == g0 else None
                row[label + "_us"] = round(time_graph(tma, R)[0], 2)
                row[label + "_equal"] = same
            except Exception as e:  # noqa: BLE001 - one variant failing to compile must not end the sweep
                row[label + "_error"] = str(e)[:200]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del kws, descs
        torch.cuda.empty_cache()
    keys = [k for k in out["rows"][0] if k.endswith("_us")]
    out["layer_us"] = {k: round(sum(r.get(k, float("nan")) for r in out["rows"]), 1) for k in keys}
    print("one layer (sum of four shapes), us:", json.dumps(out["layer_us"]), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_gemv_tma.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
