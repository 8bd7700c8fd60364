"""One default INT4 linear launch to profile under Nsight Compute (Llama-2-7B qkv shape, g128, fp16;
M = 1 by default: the decode GEMV; M = 16: the transposed tile, ``-k regex:w4_tile_t``).

    ncu --clock-control none -k regex:w4_gemv -s 3 -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section LaunchStats python3 benchmarks/gpu_gemv_profile.py [K N [M]]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.layout import KernelWeight  # noqa: E402
from awqconv.kernels.ops import w4_matmul  # noqa: E402
from awqconv.packed import PackedLinear  # noqa: E402


def main() -> None:
    K, N = (int(v) for v in sys.argv[1:3]) if len(sys.argv) > 2 else (4096, 12288)
    M = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    g = 128
    p = PackedLinear(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda"),
                     (torch.rand(N, K // g, device="cuda") * 0.01).half(),
                     torch.randint(0, 16, (N, K // g), dtype=torch.uint8, device="cuda"), K, g)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")
    for _ in range(5):
        y = w4_matmul(x, kw)
    torch.cuda.synchronize()
    ref = x.float() @ p.dequantize(torch.float32).t()
    print(f"M={M} K={K} N={N} rel err {((y.float() - ref).norm() / ref.norm()).item():.2e}")


if __name__ == "__main__":
    main()
