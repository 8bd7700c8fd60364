"""Time the CPU INT4 linear paths (awqconv.kernels.cpu) on SmolLM2-135M and 1B-class shapes.

Per shape and M: dense (cached dequantised fp32 weight + F.linear), int4pack
(torch _weight_int4pack_mm_for_cpu, fp32 activations), dequant (dequantise every call + F.linear).
Usage: nice python benchmarks/cpu_linear_paths.py [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from awqconv.kernels.cpu import CPU_PATHS, make_cpu_linear
from awqconv.packed import PackedLinear

SHAPES = {  # name: (in, out) ; SmolLM2-135M layer (fused qkv / gate_up), then a 1.7B-class layer
    "smol.qkv": (576, 960), "smol.o": (576, 576), "smol.gate_up": (576, 3072), "smol.down": (1536, 576),
    "smol.lm_head-like": (576, 49152), "2k.gate_up": (2048, 16384), "2k.down": (8192, 2048),
}


def bench(fn, x, min_time=0.3):
    fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        fn(x)
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, group {a.group}")
    print(f"{'shape':20s}{'M':>5s}" + "".join(f"{p + ' us':>14s}" for p in CPU_PATHS) + "   max|dy| int4pack-dense")
    for name, (k, n) in SHAPES.items():
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        z = torch.randint(0, 16, (n, k // a.group), dtype=torch.uint8)
        s = (torch.rand(n, k // a.group) * 0.02 + 1e-3).half()
        p = PackedLinear.from_ints(q, z, s, a.group)
        mods = {path: make_cpu_linear(p, path) for path in CPU_PATHS}
        for m in (1, 16, 128):
            x = torch.randn(m, k)
            ts = {path: bench(f, x) for path, f in mods.items()}
            d = (mods["int4pack"](x) - mods["dense"](x)).abs().max().item()
            print(f"{name:20s}{m:5d}" + "".join(f"{ts[p]:14.1f}" for p in CPU_PATHS) + f"   {d:.2e}", flush=True)


if __name__ == "__main__":
    main()
