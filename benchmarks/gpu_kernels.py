"""Kernel-level W4A16 benchmark on one GPU: awqconv's Triton kernels beside fp16 cuBLAS, torch tinygemm
(``_weight_int4pack_mm``, bf16) and GemLite (A16W4, g128), on Llama-2-7B linear shapes.

Every method is checked against a dense fp32 reference on fresh random inputs before it is timed.
Timing: one CUDA graph replays the call over R distinct weight sets (>= 400 MB of fp16-equivalent
weights, so weights never sit in L2), median of triton.testing.do_bench, divided by R. awqconv runs
its default config (and the same without programmatic dependent launch) and a sweep of tile shapes
of the kernels the defaults use.
Usage: python benchmarks/gpu_kernels.py [--quick] [--no-sweep] [--chain] [--ms 1,16] [--sweep-ms 16]
       [--sweep-filter tile_t,wave] [--dtype bf16] [--dequant-min-m 257] [--device cuda] [--out DIR]
(--dtype bf16: bf16 activations and scales; cuBLAS in bf16; GemLite, fp16-only here, is left out.
--dequant-min-m: the rows from which awqconv's default dequantises + runs cuBLAS, RuntimeOptions'.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.config import (
    DEQUANT_MIN_M,
    KernelConfig,
    cuda_core_gemv_config,
    default_config,
    one_wave_split,
    pow2_divisor,
)
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import w4_matmul
from awqconv.packed import PackedLinear

G = 128
SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
DEV = torch.device("cuda")  # --device
DT = torch.float16  # activations, scales and the cuBLAS baseline (--dtype)
DEQUANT_M = DEQUANT_MIN_M  # --dequant-min-m


def make_packed(K: int, N: int) -> PackedLinear:
    """Random INT4 g``G`` weights ``[N, K]`` on the benchmark device (``DT`` scales)."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=DEV)
    zeros = torch.randint(0, 16, (N, K // G), dtype=torch.uint8, device=DEV)
    scales = (torch.rand(N, K // G, device=DEV) * 0.01 + 0.001).to(DT)
    return PackedLinear(qweight, scales, zeros, K, G)


def make_set(K: int, N: int) -> dict:
    p = make_packed(K, N)
    return {"p": p, "W": p.dequantize(DT)}  # W [N, K]


def distinct_kernel_weights(K: int, N: int, min_bytes: float = 400e6) -> list[KernelWeight]:
    """Enough random weights ``[N, K]`` in kernel layout (at least two) that cycling through them
    reads >= ``min_bytes`` of fp16-sized weights: the L2 cannot hold them."""
    return [KernelWeight.from_packed(make_packed(K, N)) for _ in range(max(2, math.ceil(min_bytes / (K * N * 2))))]


# ---- methods: build(set) -> state; call(x, state) -> y -------------------------------------------
def m_cublas():
    return (lambda st: st["W"]), (lambda x, W: F.linear(x, W))


def m_awq(pdl: bool = True):
    """awqconv's default kernel per M (``w4_matmul`` with no config), with or without PDL."""
    return (lambda st: KernelWeight.from_packed(st["p"])), (
        lambda x, kw: w4_matmul(x, kw, pdl=pdl, dequant_min_m=DEQUANT_M))


def wave_config(kw: KernelWeight, per_sm: int, maxnreg: int | None, block_n: int = 64, num_warps: int = 2,
                kc: int = 64) -> KernelConfig:
    """The one-row fp16x2 GEMV split into one wave of at most ``per_sm`` programs per SM, registers
    capped at ``maxnreg`` (the default: 16, 64, 64 columns x 2 warps, 64-row chunks)."""
    return KernelConfig("gemv_f16x2", block_n=block_n, kc=pow2_divisor(kw.group_size, kc),
                        split_k=one_wave_split(kw.out_features, block_n, per_sm, DEV), num_warps=num_warps,
                        num_stages=2, maxnreg=maxnreg)


def m_tinygemm():
    def build(st):
        p = st["p"]
        u8 = ((p.qweight << 4) | (p.qweight >> 4)).contiguous()  # tinygemm wants the even k in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        s, z = p.scales.float().t(), p.zeros.float().t()
        sz = torch.stack([s, (8 - z) * s], 2).to(torch.bfloat16).contiguous()
        return packed, sz
    return build, (lambda x, P: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), P[0], G, P[1]))


def m_gemlite():
    from gemlite import DType, GemLiteLinear

    def build(st):
        p = st["p"]
        K, N = p.in_features, p.out_features
        lin = GemLiteLinear(4, group_size=G, in_features=K, out_features=N,
                            input_dtype=DType.FP16, output_dtype=DType.FP16)
        lin.pack(p.unpack(), p.scales, p.zeros.half(), None)
        return lin
    return build, (lambda x, L: L(x))


def sweep_configs(M: int, kw: KernelWeight) -> dict[str, KernelConfig]:
    """Named tile shapes of the kernels the defaults use, per M bucket; split_k=-p asks for ~p
    programs per SM; tile_t's pf = stages of its cp.async ring."""
    out = {}
    if M == 1:  # the fp16x2 GEMV over tile width, warps, chunk rows, programs per SM (register prefetch)
        for bn, w, kc, pps in [(64, 2, 128, 8), (64, 2, 64, 12), (64, 2, 64, 16), (64, 2, 64, 24), (64, 2, 64, 32),
                               (64, 2, 64, 48), (32, 1, 128, 16), (128, 2, 32, 16), (256, 2, 16, 8)]:
            out[f"h2_bn{bn}_w{w}_kc{kc}_p{pps}"] = KernelConfig("gemv_f16x2", 1, bn, kc, -pps, w, 2)
        for pps, mr in [(16, 72), (32, 72), (16, 64), (32, 64), (48, 64), (16, 56), (16, 60), (16, 68), (20, 64),
                        (24, 64), (12, 64), (24, 56)]:  # register caps: more programs resident
            out[f"h2_bn64_w2_kc64_p{pps}_mr{mr}"] = KernelConfig("gemv_f16x2", 1, 64, 64, -pps, 2, 2, maxnreg=mr)
        # one resident wave of at most per_sm programs per SM (the default: 64 x 2 warps, 16, capped at 64)
        for per_sm, mr, bn, w in [(16, None, 64, 2), (18, 56, 64, 2), (20, 48, 64, 2), (32, 64, 32, 1),
                                  (8, 64, 128, 4), (16, 64, 32, 1), (24, 80, 32, 1)]:
            out[f"h2_wave{per_sm}_mr{mr}_bn{bn}_w{w}"] = wave_config(kw, per_sm, mr, bn, w)
        for per_sm, mr in [(16, 64), (12, 80), (8, 128), (10, 96)]:  # 128-row chunks: twice the bytes in flight
            out[f"h2_wave{per_sm}_mr{mr}_kc128"] = wave_config(kw, per_sm, mr, kc=128)
        out["fp32_gemv"] = cuda_core_gemv_config(1, kw)  # the path without inline PTX (and for fp32 rows)
    if M <= 16:  # the transposed tile: asm-dequantised weights as the MMA's register operand (tile_t.py)
        # pf >= 2: a cp.async ring of pf stages (3 stages: 1.4x the one-chunk register prefetch at M = 16);
        # "fit c": at most c programs per SM in one wave (split = floor(c * SMs / tiles)), registers capped
        for c, pf, mr in [(5, 4, None), (5, 3, None), (6, 3, 80), (7, 3, 64), (6, 4, 80), (5, 3, 64), (7, 3, 72)]:
            split = one_wave_split(kw.out_features, 64, c, DEV)
            out[f"tile_t_bn64_kc128_fit{c}_pf{pf}_mr{mr}"] = KernelConfig("tile_t", 16, 64, 128, split, 4, 1,
                                                                         prefetch=pf, maxnreg=mr)
        for pps, pf, mr in [(6, 4, None), (8, 4, None), (10, 4, None), (6, 3, 64), (8, 3, 64), (7, 3, 64)]:
            out[f"tile_t_bn64_kc128_p{pps}_pf{pf}_mr{mr}"] = KernelConfig("tile_t", 16, 64, 128, -pps, 4, 1,
                                                                         prefetch=pf, maxnreg=mr)
    if 16 < M <= 512:
        for bm, bn, kc, w, pps, pf in [(64, 64, 128, 4, 8, 3), (64, 128, 64, 8, 4, 3), (64, 64, 64, 4, 8, 4),
                                       (min(M, 128), 128, 64, 8, 2, 3), (min(M, 128), 64, 128, 4, 4, 3)]:
            out[f"tile_t{bm}_bn{bn}_kc{kc}_w{w}_p{pps}_pf{pf}"] = KernelConfig("tile_t", bm, bn, kc, -pps, w, 1,
                                                                              prefetch=pf)
    out["dequant+cublas"] = KernelConfig("dequant", block_n=256, kc=32)
    if M >= 1024:  # the dequantise tile: rows x columns (each word loaded once where kc divides the group)
        for kc, bn, w in [(64, 128, 4), (128, 128, 8), (32, 256, 4), (64, 256, 8), (16, 256, 4), (128, 64, 4)]:
            out[f"dequant_kc{kc}_bn{bn}_w{w}+cublas"] = KernelConfig("dequant", block_n=bn, kc=kc, num_warps=w)
    return out


def run_info(**extra) -> dict:
    """The header every GPU benchmark result carries: device, versions, the device's clock."""
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **extra}


def time_graph(fn, R: int) -> tuple[float, str]:
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ms = triton.testing.do_bench(g.replay, warmup=20, rep=120, return_mode="median")
        return ms / R * 1e3, "graph"
    except Exception:  # noqa: BLE001 - report eager timing for a method that cannot be captured
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=20, rep=120, return_mode="median")
        return ms / R * 1e3, "eager"


def rel_err(y, x, W):
    ref = x.float() @ W.float().t()
    return ((y.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--ms", default=None, help="comma-separated M values (default: all seven)")
    ap.add_argument("--sweep-ms", default=None, type=lambda v: [int(m) for m in v.split(",")],
                    help="sweep configs only at these M (default: every M)")
    ap.add_argument("--sweep-filter", default=None, type=lambda v: v.split(","),
                    help="sweep only the variants whose name contains one of these comma-separated strings")
    ap.add_argument("--chain", action="store_true", help="also time the four linears back to back in one graph")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--dequant-min-m", type=int, default=DEQUANT_MIN_M,
                    help="rows from which awqconv's default dequantises + runs cuBLAS (RuntimeOptions.dequant_min_m)")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    global DT, DEV, DEQUANT_M
    DT = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    DEV = torch.device(a.device)
    DEQUANT_M = a.dequant_min_m
    torch.manual_seed(0)
    info = run_info(dtype=a.dtype, dequant_min_m=DEQUANT_M)
    print(info, flush=True)
    Ms = [1, 16, 256, 4096] if a.quick else [1, 4, 16, 64, 256, 1024, 4096]
    if a.ms:
        Ms = [int(m) for m in a.ms.split(",")]
    base = {"fp16_cublas": m_cublas(), "awq_default": m_awq(), "torch_tinygemm_bf16": m_tinygemm()}
    try:
        if DT == torch.float16:
            base["gemlite_a16w4"] = m_gemlite()
    except Exception as e:  # noqa: BLE001
        print("gemlite unavailable:", repr(e)[:200], flush=True)
    rows = []
    t_start = time.time()
    for sname, (K, N) in SHAPES.items():
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        sets = [make_set(K, N) for _ in range(R)]
        for mname, (build, call) in base.items():
            try:
                built = [build(st) for st in sets]
            except Exception as e:  # noqa: BLE001
                print(f"{mname} build failed on {sname}: {e!r}"[:300], flush=True)
                continue
            for M in Ms:
                variants = {"": None}  # name -> (config, pdl); "" = the method itself
                if mname == "awq_default":
                    d = default_config(M, built[0], DEV, DT, DEQUANT_M)
                    if d.kind != "dequant":
                        variants["default_no_pdl"] = (d, False)
                    if not a.no_sweep and (a.sweep_ms is None or M in a.sweep_ms):
                        variants.update({n: (c, True) for n, c in sweep_configs(M, built[0]).items()
                                         if a.sweep_filter is None or any(f in n for f in a.sweep_filter)})
                for vname, var in variants.items():
                    label = mname if not vname else f"awq:{vname}"
                    cfg = None if var is None else var[0]
                    if var is not None:
                        fn1 = lambda x, b, cfg=cfg, pdl=var[1]: w4_matmul(x, b, cfg, pdl=pdl)
                    else:
                        fn1 = call
                    try:
                        x = torch.randn(M, K, dtype=DT, device=DEV)
                        y = fn1(x, built[0])
                        err = rel_err(y, x, sets[0]["W"])
                        x2 = torch.randn(M, K, dtype=DT, device=DEV)  # fresh input, 2nd set
                        err2 = rel_err(fn1(x2, built[-1]), x2, sets[-1]["W"])
                        again = fn1(x, built[0])
                        stable = bool(torch.equal(again, y)) if cfg is not None or mname == "awq_default" else True
                        ok = max(err, err2) < 1e-2 and stable
                        us, how = time_graph(lambda: [fn1(x, b) for b in built], R) if ok else (float("nan"), "-")
                    except Exception as e:  # noqa: BLE001
                        print(f"{label} {sname} M={M} failed: {e!r}"[:300], flush=True)
                        continue
                    qbytes = K * N / 2 + (K // G) * N * 3
                    wb = K * N * 2 if mname == "fp16_cublas" else qbytes
                    row = dict(shape=sname, K=K, N=N, M=M, method=label, us=round(us, 2),
                               GBps=round((wb + M * (K + N) * 2) / (us * 1e-6) / 1e9) if us == us else None,
                               TFLOPs=round(2 * M * K * N / (us * 1e-6) / 1e12, 1) if us == us else None,
                               rel_err=float(f"{max(err, err2):.2e}"), stable=stable, ok=ok, timing=how)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del built
            torch.cuda.empty_cache()
        del sets
        torch.cuda.empty_cache()
    chain = layer_chain(Ms, base) if a.chain else []
    info["elapsed_s"] = round(time.time() - t_start)
    with open(os.path.join(a.out, "gpu_kernels.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "layer_chain": chain}, f, indent=1)
    summarize(rows, Ms)


def layer_chain(Ms: list[int], base: dict) -> list[dict]:
    """One graph replays qkv -> o -> gate_up -> down (as in a decoder layer, inputs fixed) over 3
    distinct layers of weights (~315 MB of INT4, 1.2 GB fp16): the four linears back to back, so
    launch gaps and any overlap between consecutive kernels count as they would in a model."""
    L = 3
    layers = [{s: make_set(K, N) for s, (K, N) in SHAPES.items()} for _ in range(L)]
    methods = {"fp16_cublas": base["fp16_cublas"], "awq_default": base["awq_default"],
               "awq_default_no_pdl": m_awq(pdl=False)}
    if "gemlite_a16w4" in base:
        methods["gemlite_a16w4"] = base["gemlite_a16w4"]
    out = []
    for mname, (build, call) in methods.items():
        try:
            built = [{s: build(st) for s, st in lay.items()} for lay in layers]
        except Exception as e:  # noqa: BLE001
            print(f"chain: {mname} build failed: {e!r}"[:300], flush=True)
            continue
        for M in Ms:
            xs = {K: torch.randn(M, K, dtype=DT, device=DEV) for K, _ in SHAPES.values()}
            order = list(SHAPES.items())

            def step():
                return [call(xs[K], b[s]) for b in built for s, (K, N) in order]
            try:
                ys = step()
                ok = all(rel_err(y, xs[K], lay[s]["W"]) < 1e-2 for y, (lay, (s, (K, N))) in
                         zip(ys, [(lay, it) for lay in layers for it in order]))
                us = time_graph(step, L)[0] if ok else float("nan")
                if mname.startswith("awq"):  # deterministic kernels: a race (PDL, workspace) would show here
                    ok = ok and all(torch.equal(a, b) for a, b in zip(ys, step()))
            except Exception as e:  # noqa: BLE001
                print(f"chain: {mname} M={M} failed: {e!r}"[:300], flush=True)
                continue
            row = {"method": mname, "M": M, "layer_us": round(us, 2), "ok": ok}
            out.append(row)
            print("chain", json.dumps(row), flush=True)
        del built
        torch.cuda.empty_cache()
    return out


def summarize(rows, Ms) -> None:
    def layer(method, M):
        t = {r["shape"]: r["us"] for r in rows if r["M"] == M and r["method"] == method and r["ok"]}
        return sum(t.values()) if len(t) == 4 else None

    def best_awq(M):  # per shape, the best ok awq variant (default included)
        tot, names = 0.0, []
        for s in SHAPES:
            c = [r for r in rows if r["M"] == M and r["shape"] == s and r["ok"]
                 and (r["method"] == "awq_default" or r["method"].startswith("awq:"))]
            if not c:
                return None, []
            b = min(c, key=lambda r: r["us"])
            tot += b["us"]
            names.append(f"{s}={b['method'].removeprefix('awq:')}")
        return tot, names

    print("\none layer's four linears (qkv+o+gate_up+down), us; x = speedup over fp16 cuBLAS")
    methods = ["fp16_cublas", "awq_default", "torch_tinygemm_bf16", "gemlite_a16w4"]
    print("M".ljust(6) + "".join(m[:20].rjust(22) for m in methods) + "awq best-of-sweep".rjust(22))
    for M in Ms:
        b = layer("fp16_cublas", M)
        line = str(M).ljust(6)
        for m in methods:
            t = layer(m, M)
            line += (f"{t:9.1f} ({b / t:4.2f}x)" if t and b else "-").rjust(22)
        t, names = best_awq(M)
        line += (f"{t:9.1f} ({b / t:4.2f}x)" if t and b else "-").rjust(22)
        print(line)
        if names:
            print("      best: " + ", ".join(names))


if __name__ == "__main__":
    main()
