"""Experiment (notes/gpu_notes.md, run AW): tile_t over N-major words whose nibbles sit in the MMA
register operand's k order, so each thread's words are one 16-byte load and need no layout change.

Run AI put k in the fragments' order on the [K/8, N] layout: the shared-memory round trip of the
weight operand went away but a thread's four words per chunk were N words apart (4-byte cp.async
pieces) and it lost. Here the words are stored [N, K/8]: in each KC-row chunk of row n, word
4 t + b (t the lane's quad position, b < KC/32) holds k = 32 b + 16 v2 + 8 v1 + 2 t + v0 for the value
v = 4 v2 + 2 v1 + v0 that tile_t's asm block yields as its v-th output, i.e. exactly the 8 fp16 a lane
holds of rows n of the A fragments of four k16 steps. x^T stays in natural order.

  python benchmarks/gpu_tile_nmajor.py check            # CPU, TRITON_INTERPRET=1: bit-level vs tile_t
  python benchmarks/gpu_tile_nmajor.py sass --out DIR   # offline sm_90 compile: registers, loop SASS
  python benchmarks/gpu_tile_nmajor.py bench            # GPU: per-layer us at M = 4, 16 beside tile_t
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

if len(sys.argv) > 1 and sys.argv[1] == "check":
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels import ops  # noqa: E402
from awqconv.kernels.launch import pdl_start as _pdl_start  # noqa: E402
from awqconv.kernels.launch import pdl_wait as _pdl_wait  # noqa: E402
from awqconv.kernels.layout import NIBBLE_SHIFTS, KernelWeight, unpack_words  # noqa: E402
from awqconv.kernels.tile_t import _F16_MAGIC, _WORD_F16, _pairs  # noqa: E402
from awqconv.kernels.triton_w4 import _finish_tile, _nibble_shift, _round_to, _tile_id, _tile_index  # noqa: E402


def pack_nmajor(qw: torch.Tensor, kc: int) -> torch.Tensor:
    """Kernel-layout words [K/8, N] -> N-major words [N, K/8] in the fragment order above."""
    q = unpack_words(qw).to(torch.int32)  # [N, K]
    n, k = q.shape
    nb = kc // 32
    # k = chunk*kc + 32 b + 16 v2 + 8 v1 + 2 t + v0  ->  word chunk*(kc/8) + nb t + b, value 4 v2 + 2 v1 + v0
    v = q.reshape(n, k // kc, nb, 2, 2, 4, 2).permute(0, 1, 5, 2, 3, 4, 6).reshape(n, k // 8, 8)
    shifts = torch.tensor(NIBBLE_SHIFTS, dtype=torch.int32, device=q.device)
    return (v << shifts).sum(-1, dtype=torch.int32).contiguous()


@triton.jit
def _to_k_order(v, BN: tl.constexpr, KC: tl.constexpr):
    """[BN, KC/8, 8] values (word 4t+b... see above, value index last) -> [BN, KC] in natural k."""
    v = tl.reshape(v, (BN, 4, KC // 32, 2, 2, 2))
    return tl.reshape(tl.permute(v, (0, 2, 3, 4, 1, 5)), (BN, KC))


@triton.jit
def _dequant_nm(w, s, z, BN: tl.constexpr, KC: tl.constexpr, USE_ASM: tl.constexpr):
    if USE_ASM:
        sbits = _pairs(s.to(tl.int16, bitcast=True).to(tl.int32)) + w * 0
        zz = z * 0x10001 + _F16_MAGIC + w * 0
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            asm=_WORD_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args=[w, zz, sbits],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        # nested joins: minor dims (c1, c2, c3) with 4 c1 + 2 c2 + c3 = the output index
        v = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    else:
        q = (w[:, :, None] >> _nibble_shift(tl.arange(0, 8))[None, None, :]) & 15
        v = _round_to((q - z[:, :, None]).to(tl.float32) * s.to(tl.float32)[:, :, None], tl.float16)
    return _to_k_order(v, BN, KC)


@triton.jit
def w4_tile_nm_kernel(x_ptr, qn_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                      M, N, K, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, GROUP: tl.constexpr,
                      SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr = 4,
                      DOT_F32: tl.constexpr = False, USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False,
                      SZ: tl.constexpr = False):
    _pdl_start(USE_PDL)
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, KC)
    mm = rm < M
    mn = rn < N
    row = tl.multiple_of(rn * (K // 8), KC // 8)  # K % KC == 0 here
    w_ptrs = qn_ptr + row[:, None] + tl.arange(0, KC // 8)[None, :]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _pdl_wait(USE_PDL)
    for k0 in tl.range(k_lo, k_hi, KC, num_stages=PREFETCH):
        w = tl.load(w_ptrs + tl.multiple_of(k0 // 8, KC // 8), mask=mn[:, None], other=0,
                    eviction_policy="evict_first")
        g = (k0 // GROUP) * N + rn
        if SZ:  # one int32 per (group, column): scale bits | zero << 16 (a 4-byte cp.async piece)
            sz = tl.load(s_ptr + g, mask=mn, other=0)[:, None]
            s = (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            z = sz >> 16
        else:
            s = tl.load(s_ptr + g, mask=mn, other=0.0)[:, None]
            z = tl.load(z_ptr + g, mask=mn, other=0).to(tl.int32)[:, None]
        xt = tl.load(x_ptrs + k0, mask=mm[None, :], other=0.0)
        wt = _dequant_nm(w, s, z, BLOCK_N, KC, USE_ASM)
        if DOT_F32:
            acc += tl.dot(wt.to(tl.float32), xt.to(tl.float32))
        else:
            acc = tl.dot(wt, xt, acc)
    _finish_tile(tl.trans(acc), rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, _tile_id(), pid_k, SPLIT_K,
                 SPLIT_P2, HAS_BIAS)


def pack_sz(kw: KernelWeight) -> torch.Tensor:
    """fp16 scales and uint8 zeros [K/G, N] -> int32 scale bits | zero << 16."""
    return (kw.scales.view(torch.int16).to(torch.int32) & 0xFFFF) | (kw.zeros.to(torch.int32) << 16)


def nm_launch(x: torch.Tensor, kw: KernelWeight, qn: torch.Tensor, cfg: ops.KernelConfig,
              sz: torch.Tensor | None = None) -> ops.MatmulLaunch:
    """tile_t's launch for ``cfg`` with this kernel and the N-major words (``sz``: packed scales/zeros)."""
    p = ops.plan_matmul(x, kw, replace(cfg, park=False))  # this kernel merges in the tile's last program
    args = (p.args[0], qn, p.args[2] if sz is None else sz, *p.args[3:])
    return ops.MatmulLaunch(w4_tile_nm_kernel, p.grid, args, dict(p.meta, SZ=sz is not None), p.y)


def check() -> None:
    from awqconv.packed import PackedLinear

    torch.manual_seed(0)
    worst = 0.0
    for M, K, N, G, kc, bn, split in [(16, 256, 64, 128, 128, 64, 1), (5, 512, 96, 128, 128, 32, 2),
                                      (9, 256, 64, 64, 64, 64, 1), (16, 384, 64, 128, 128, 64, 3)]:
        p = PackedLinear(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8),
                         (torch.rand(N, K // G) * 0.01 + 0.001).half(),
                         torch.randint(0, 16, (N, K // G), dtype=torch.uint8), K, G)
        kw = KernelWeight.from_packed(p)
        x = torch.randn(M, K).half()
        cfg = ops.KernelConfig("tile_t", block_m=16, block_n=bn, kc=kc, split_k=split, prefetch=3)
        y_t = ops.plan_matmul(x, kw, cfg)()
        y_n = nm_launch(x, kw, pack_nmajor(kw.qw, kc), cfg)()
        assert torch.equal(nm_launch(x, kw, pack_nmajor(kw.qw, kc), cfg, pack_sz(kw))(), y_n)
        ref = x.float() @ p.dequantize(torch.float16).float().t()
        d = (y_n.float() - y_t.float()).abs().max().item()
        worst = max(worst, d)
        print(f"M={M} K={K} N={N} G={G} kc={kc}: |nm - tile_t| {d:.3g}, |nm - ref| "
              f"{(y_n.float() - ref).abs().max().item():.3g} (|ref| {ref.abs().max().item():.3g})")
    assert worst == 0.0, "the N-major kernel must give tile_t's bits (same products, same order per chunk)"
    print("check: bit-identical to tile_t")


def sass(out: str) -> None:
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.makedirs(out, exist_ok=True)
    sig = {"x_ptr": "*fp16", "qn_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*fp16",
           "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "K_SPLIT": "i32",
           "SPLIT_K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    names = list(sig)
    div = [names.index(n) for n in names if n not in ("M", "SPLIT_K")]
    for kern, label in ((w4_tile_nm_kernel, "nm"), (w4_tile_nm_kernel, "nm_sz"), (ops.w4_tile_t_kernel, "tile_t")):
        const = dict(BLOCK_M=16, BLOCK_N=64, KC=128, GROUP=128, SPLIT_P2=8, HAS_BIAS=False, PREFETCH=4,
                     DOT_F32=False, USE_ASM=True, USE_PDL=True)
        if label != "tile_t":
            const["SZ"] = label == "nm_sz"
        s2 = {k.replace("qn_ptr", "qw_ptr") if label == "tile_t" else k: v for k, v in sig.items()}
        if label == "nm_sz":
            s2["s_ptr"] = "*i32"
        s2.update({k: "constexpr" for k in const})
        src = ASTSource(fn=kern, signature=s2, constexprs=const, attrs={(i,): [["tt.divisibility", 16]] for i in div})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        base = os.path.join(out, label)
        open(base + ".cubin", "wb").write(c.asm["cubin"])
        open(base + ".ttgir", "w").write(c.asm["ttgir"])
        cu = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        text = subprocess.run([cu, "-sass", base + ".cubin"], capture_output=True, text=True).stdout
        open(base + ".sass", "w").write(text)
        res = subprocess.run([cu, "--dump-resource-usage", base + ".cubin"], capture_output=True, text=True).stdout
        print(label, [ln.strip()[:60] for ln in res.splitlines() if "REG" in ln], "smem", c.metadata.shared)


def bench(out: str) -> None:
    from gpu_kernels import SHAPES, make_set, rel_err, time_graph

    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(0), "triton": triton.__version__, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    rows = []
    variants = {"tile_t": None}
    for pps, pf, sz in [(6, 4, False), (6, 4, True), (6, 3, True), (8, 3, True), (8, 4, True), (5, 4, True)]:
        variants[f"nm{'_sz' if sz else ''}_p{pps}_pf{pf}"] = (pps, pf, sz)
    for shape, (K, N) in SHAPES.items():
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        sets = [make_set(K, N) for _ in range(R)]
        kws = [KernelWeight.from_packed(st["p"]) for st in sets]
        qns = [pack_nmajor(kw.qw, 128) for kw in kws]
        szs = [pack_sz(kw) for kw in kws]
        for M in (4, 16):
            x = torch.randn(M, K, dtype=torch.float16, device=dev)
            base = ops.default_config(M, kws[0], dev)
            for name, v in variants.items():
                if v is None:
                    def call(i, base=base):
                        return ops.w4_matmul(x, kws[i], base)
                else:
                    cfg = replace(base, split_k=-v[0], prefetch=v[1])
                    launches = [nm_launch(x, kws[i], qns[i], cfg, szs[i] if v[2] else None) for i in range(R)]

                    def call(i, launches=launches):
                        return launches[i]()
                y = call(0)
                err = rel_err(y, x, sets[0]["W"])
                same = torch.equal(y, ops.w4_matmul(x, kws[0], base))
                us = time_graph(lambda: [call(i) for i in range(R)], R)[0] if err < 1e-2 else float("nan")
                row = dict(shape=shape, M=M, variant=name, us=round(us, 2), rel_err=float(f"{err:.2e}"),
                           bits_equal_tile_t=same)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for M in (4, 16):
        for name in variants:
            summary[f"M{M}_{name}"] = round(sum(r["us"] for r in rows if r["M"] == M and r["variant"] == name), 1)
    print(json.dumps(summary, indent=1))
    with open(os.path.join(out, "gpu_tile_nmajor.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "per_layer_us": summary}, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["check", "sass", "bench"])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    {"check": check, "sass": lambda: sass(a.out), "bench": lambda: bench(a.out)}[a.mode]()
