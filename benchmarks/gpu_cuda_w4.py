"""Experiment (notes/gpu_notes.md, run AZ): would a hand-written CUDA kernel reach the M = 16 goal
(<= 70 us per 7B layer) that the Triton tiles miss (tile_t 86.5)?

Not part of the package: the issue asks for Triton kernels, tested on the CPU under the interpreter,
and this kernel can only run on a GPU. It is compiled at run time by NVRTC (``torch.cuda._compile_kernel``,
no CUDA toolkit needed) and uses inline PTX only (no CUDA headers).

Design (written here from the PTX ISA; Marlin-like in spirit): y [M <= 16, N] = x W with
``mma.sync.m16n8k16`` (fp32 accumulate), x as the A operand (16 rows, ldmatrix from shared memory,
loaded once per CTA for its K range) and the dequantised weights as the B operand straight from
registers. The words are re-laid out so that, per warp and 64-row step, each lane's two 16-byte
loads hold exactly the nibbles of its B fragments for a 32-column strip (4 n8 tiles x 4 k16 steps),
in the order one ``lop3`` per register pair extracts (fp16 1024 + q, minus 1024 + z: q - z exactly);
the MMA sums (q - z) x over each group of 128 rows in fp32 and the group's scale multiplies that sum
(fp32), so no per-weight multiply (a different rounding from tile_t's fp16 (q - z) s operand). A register ring of DEPTH steps keeps loads in flight; split-K partials
merge deterministically (the last CTA of a column block sums them in split order).

  python benchmarks/gpu_cuda_w4.py ptx --nvrtc /path/libnvrtc.so.12   # here: PTX -> ptxas -> SASS stats
  python benchmarks/gpu_cuda_w4.py bench                              # GPU: check, then time vs tile_t
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.layout import KernelWeight, unpack_words

DEPTH = 4
GROUP = 128
SRC = r"""
#define GROUP GROUPV
#define SPG (GROUP / 64)
struct U4 { unsigned x, y, z, w; };

__device__ __forceinline__ U4 ldg4(const U4* p) {
    U4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ float ldcg(const float* p) {
    float v;
    asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));  // after the ticket: final values (L2)
    return v;
}

__device__ __forceinline__ unsigned lop(unsigned w) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "r"(0x000F000Fu), "r"(0x64006400u));
    return r;
}

__device__ __forceinline__ unsigned hsub(unsigned p, unsigned zz) {
    unsigned r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(p), "r"(zz));
    return r;
}

__device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

extern "C" __global__ void __launch_bounds__(128) w4_mma16(
    const unsigned short* __restrict__ x, const U4* __restrict__ qp, const unsigned short* __restrict__ sc,
    const unsigned char* __restrict__ zp, float* __restrict__ ws, unsigned* __restrict__ cnt,
    unsigned short* __restrict__ y, int M, int N, int K, int KR, int splits)
{
    // shared: x [16][KR + 8] fp16 (padded rows: conflict-free ldmatrix), then per group of the K range and
    // column of the block: the scale as fp32 and the zero as fp16x2 (1024 + z) in both halves
    extern __shared__ __align__(16) unsigned short xs[];
    __shared__ unsigned last_flag;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3, g = lane >> 2;
    const int nb = blockIdx.x, split = blockIdx.y;
    const int k_lo = split * KR, k_hi = min(k_lo + KR, K), kr = k_hi - k_lo;
    const int XS = KR + 8, NG = KR / GROUP;
    float* sf = (float*)(xs + 16 * XS);
    unsigned* sz = (unsigned*)(sf + NG * 128);
    const int s = nb * 4 + warp, n0 = s * 32, wc = warp * 32;
    // the first DEPTH steps' words are requested before x and the scales are staged (they do not depend on them)
    const int n_it = n0 < N ? kr / 64 : 0, KI = K / 64;
    const U4* base = qp + ((size_t)s * KI + k_lo / 64) * 64 + lane;
    U4 buf[DEPTH][2];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
        if (d < n_it) { buf[d][0] = ldg4(base + d * 64); buf[d][1] = ldg4(base + d * 64 + 32); }
    for (int i = threadIdx.x; i < 16 * (KR / 8); i += 128) {
        const int r = i / (KR / 8), c8 = (i % (KR / 8)) * 8;
        U4 v = {0u, 0u, 0u, 0u};
        if (r < M && c8 < kr) v = *(const U4*)(x + (size_t)r * K + k_lo + c8);
        *(U4*)(xs + r * XS + c8) = v;
    }
    for (int i = threadIdx.x; i < NG * 128; i += 128) {
        const int gi = i >> 7, col = nb * 128 + (i & 127), grp = k_lo / GROUP + gi;
        float f = 0.f;
        unsigned z = 0x64006400u;
        if (col < N && grp * GROUP < K) {
            asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(sc[(size_t)grp * N + col]));
            z = (0x6400u + zp[(size_t)grp * N + col]) * 0x10001u;
        }
        sf[i] = f;
        sz[i] = z;
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    if (n0 < N) {
        const int mi = lane >> 3;
        const unsigned xa = smem_u32(xs) + 2u * (((lane & 7) + 8 * (mi & 1)) * XS + 8 * (mi >> 1));
        unsigned zz[4];
        float sc2[4][2], tmp[4][4];
        for (int it0 = 0; it0 < n_it; it0 += DEPTH) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                const int it = it0 + d;
                if (it < n_it) {
                    const U4 w0 = buf[d][0], w1 = buf[d][1];
                    if (it + DEPTH < n_it) {
                        buf[d][0] = ldg4(base + (it + DEPTH) * 64);
                        buf[d][1] = ldg4(base + (it + DEPTH) * 64 + 32);
                    }
                    if (d % SPG == 0) {  // a group starts: its zeros (B columns g) and scales (C columns 2t, 2t+1)
                        const int gi = it / SPG;
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            zz[j] = sz[gi * 128 + wc + 8 * j + g];
                            sc2[j][0] = sf[gi * 128 + wc + 8 * j + 2 * t];
                            sc2[j][1] = sf[gi * 128 + wc + 8 * j + 2 * t + 1];
#pragma unroll
                            for (int e = 0; e < 4; ++e) tmp[j][e] = 0.f;
                        }
                    }
                    const unsigned wd[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
                    for (int ks = 0; ks < 4; ++ks) {
                        unsigned a[4];
                        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                                     : "r"(xa + 2u * (it * 64 + ks * 16)));
#pragma unroll
                        for (int p = 0; p < 2; ++p) {  // q - z exact in fp16; the scale goes on per group below
                            const unsigned w = wd[ks * 2 + p];
                            mma(tmp[2 * p], a, hsub(lop(w), zz[2 * p]), hsub(lop(w >> 4), zz[2 * p]));
                            mma(tmp[2 * p + 1], a, hsub(lop(w >> 8), zz[2 * p + 1]), hsub(lop(w >> 12), zz[2 * p + 1]));
                        }
                    }
                    if (d % SPG == SPG - 1) {
#pragma unroll
                        for (int j = 0; j < 4; ++j)
#pragma unroll
                            for (int e = 0; e < 4; ++e) acc[j][e] = fmaf(tmp[j][e], sc2[j][e & 1], acc[j][e]);
                    }
                }
            }
        }
    }
    // split-K: partials to the workspace; the last CTA of this column block sums them in split order
    if (n0 < N) {
        float* wsp = ws + (size_t)split * M * N;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + 8 * j + 2 * t;
            if (g < M) { wsp[(size_t)g * N + col] = acc[j][0]; wsp[(size_t)g * N + col + 1] = acc[j][1]; }
            if (g + 8 < M) { wsp[(size_t)(g + 8) * N + col] = acc[j][2]; wsp[(size_t)(g + 8) * N + col + 1] = acc[j][3]; }
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_flag = atomicAdd(cnt + nb, 1u) == (unsigned)(splits - 1);
    __syncthreads();
    if (last_flag) {
        __threadfence();
        const int col = nb * 128 + threadIdx.x;
        if (col < N) {  // all rows' loads of one split in flight together; splits summed in order
            float v[16];
#pragma unroll
            for (int r = 0; r < 16; ++r) v[r] = 0.f;
            for (int sp = 0; sp < splits; ++sp) {
                const float* p = ws + (size_t)sp * M * N + col;
#pragma unroll
                for (int r = 0; r < 16; ++r)
                    if (r < M) v[r] += ldcg(p + (size_t)r * N);
            }
#pragma unroll
            for (int r = 0; r < 16; ++r) {
                if (r < M) {
                    unsigned short h;
                    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v[r]));
                    y[(size_t)r * N + col] = h;
                }
            }
        }
        if (threadIdx.x == 0) cnt[nb] = 0u;
    }
}
"""


def source(depth: int = DEPTH) -> str:
    return SRC.replace("DEPTH", str(depth)).replace("GROUPV", str(GROUP))


def prepack(kw: KernelWeight) -> torch.Tensor:
    """Kernel-layout words -> this kernel's blocks: [N/32 strips][K/64 steps][2][32 lanes][4 words],
    word (ks2, p) of half h holding, for lane (g, t), k16 step 2h + ks2 and n8 tiles 2p, 2p + 1."""
    q = unpack_words(kw.qw).to(torch.int64)  # [N, K]
    N, K = q.shape
    S, I = N // 32, K // 64
    v = q.view(S, 2, 2, 8, I, 2, 2, 2, 4, 2)  # (s, p, jj, g, i, h, ks2, reg, t, half)
    v = v.permute(0, 4, 5, 3, 8, 6, 1, 9, 2, 7).reshape(S, I, 2, 32, 4, 8)  # slots (half, jj, reg)
    idx = torch.arange(8, device=q.device)
    shifts = 16 * (idx // 4) + 4 * (idx % 4)
    w = (v << shifts).sum(-1)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return w.contiguous().view(-1)


class CudaW4:
    def __init__(self, kr: int, depth: int = DEPTH):
        self.fn = torch.cuda._compile_kernel(source(depth), "w4_mma16")
        self.kr = kr
        smem = 16 * (kr + 8) * 2 + (kr // GROUP) * 128 * 8
        if smem >= 48 * 1024:
            self.fn.set_shared_memory_config(smem)
        self.smem = smem

    def plan(self, x: torch.Tensor, kw: KernelWeight, qp: torch.Tensor):
        M, K = x.shape
        N = kw.out_features
        splits = math.ceil(K / self.kr)
        ws = torch.empty(splits * M * N, dtype=torch.float32, device=x.device)
        cnt = torch.zeros(N // 128 + 1, dtype=torch.int32, device=x.device)
        y = torch.empty(M, N, dtype=torch.float16, device=x.device)
        assert kw.group_size == GROUP and K % GROUP == 0 and N % 128 == 0, "experiment: g128, N % 128 == 0"
        args = [x, qp, kw.scales, kw.zeros, ws, cnt, y, M, N, K, self.kr, splits]

        def call():
            self.fn(grid=(N // 128, splits, 1), block=(128, 1, 1), args=args, shared_mem=self.smem)
            return y
        return call


def ptx(nvrtc: str, out: str) -> None:
    """Compile here without a GPU: NVRTC -> PTX, Triton's ptxas -> cubin, cuobjdump -> SASS stats."""
    import ctypes
    import subprocess

    import triton

    lib = ctypes.CDLL(nvrtc)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source().encode(), b"w4.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_90", b"-default-device", b"--std=c++17"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    print(log.value.decode()[-3000:])
    assert res == 0, "NVRTC failed"
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, buf)
    os.makedirs(out, exist_ok=True)
    p = os.path.join(out, "w4_mma16")
    with open(p + ".ptx", "w") as f:
        f.write(buf.value.decode())
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90", "-v", p + ".ptx", "-o", p + ".cubin"], check=True)
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", p + ".cubin"], capture_output=True, text=True,
                          check=True).stdout
    with open(p + ".sass", "w") as f:
        f.write(sass)


def bench(out: str) -> None:
    from gpu_kernels import SHAPES, make_set, rel_err, time_graph

    from awqconv.kernels import ops

    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "depth": DEPTH}
    print(info, flush=True)
    kernels = {}
    for kr, d in [(256, 4), (512, 4), (1024, 4), (512, 2), (1024, 2)]:
        try:
            kernels[f"cuda_kr{kr}_d{d}"] = CudaW4(kr, d)
        except Exception as e:  # noqa: BLE001 - e.g. no large shared-memory opt-in in this torch
            print(f"kr {kr} depth {d}: {e}", flush=True)
    rows = []
    for shape, (K, N) in SHAPES.items():
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        sets = [make_set(K, N) for _ in range(R)]
        kws = [KernelWeight.from_packed(st["p"]) for st in sets]
        qps = [prepack(kw) for kw in kws]
        for M in (1, 4, 16):
            x = torch.randn(M, K, dtype=torch.float16, device=dev)
            base = ops.default_config(M, kws[0], dev)
            variants = {"default": [lambda i, base=base, x=x, kws=kws: ops.w4_matmul(x, kws[i], base) for i in range(R)]}
            for label, kern in kernels.items():
                calls = [kern.plan(x, kws[i], qps[i]) for i in range(R)]
                variants[label] = [lambda i, c=c: c() for c in calls]
            for name, fns in variants.items():
                y = fns[0](0)
                y2 = fns[0](0).clone()
                err = rel_err(y, x, sets[0]["W"])
                stable = torch.equal(y, fns[0](0)) and torch.equal(y, y2)
                ok = err < 1e-2 and stable
                us = time_graph(lambda fns=fns: [f(i) for i, f in enumerate(fns)], R)[0] if ok else float("nan")
                rows.append({"shape": shape, "M": M, "variant": name, "us": round(us, 2),
                             "rel_err": float(f"{err:.2e}"), "stable": stable})
                print(json.dumps(rows[-1]), flush=True)
    summary = {f"M{M}_{v}": round(sum(r["us"] for r in rows if r["M"] == M and r["variant"] == v), 1)
               for M in (1, 4, 16) for v in ["default", *kernels]}
    print(json.dumps(summary, indent=1))
    with open(os.path.join(out, "gpu_cuda_w4.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "per_layer_us": summary}, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ptx", "bench"])
    ap.add_argument("--nvrtc", default="libnvrtc.so.12")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    if a.mode == "ptx":
        ptx(a.nvrtc, a.out)
    else:
        bench(a.out)
