"""The default INT4 kernels as another Triton version compiles them, timed beside the installed one.

The GPU image may carry an older Triton than ``pip install triton`` gives (the H100 image: Triton
3.6 with torch 2.11; current: 3.9). Code generation differs between versions (notes/gpu_notes.md,
runs AK and AO), so this script measures the same kernel source, same constexprs, grid and
argument specialisation, compiled by both:

  python benchmarks/gpu_aot_triton.py compile --out build/aot   # here, no GPU: cubins for sm_90a
  python benchmarks/gpu_aot_triton.py run --dir build/aot       # on the GPU: JIT vs the cubins

``compile`` plans each launch exactly as ``ops.w4_matmul`` would on an H100 (``--sms``, PDL off)
and writes one cubin per (shape, M) plus manifest.json. ``run`` re-plans on the GPU, refuses a
cubin whose plan differs, loads it through the CUDA driver API (ctypes), checks both builds against
a dense reference, and times them in the protocol of gpu_kernels.py (CUDA-graph replays over
distinct weights). Kernel-level numbers only: the runtime always uses the installed Triton.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels import ops  # noqa: E402
from awqconv.kernels.layout import KernelWeight  # noqa: E402

MS = [1, 4, 16, 64, 256]
_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
              torch.uint8: "*u8"}
_LAUNCH_KEYS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")


def _plan(M: int, kw: KernelWeight, device: torch.device) -> tuple[ops.KernelConfig, ops.MatmulLaunch]:
    # one kernel per launch (the split-K merge in the tile's last program), so a cubin alone is complete
    cfg = replace(ops.default_config(M, kw, device, torch.float16), pdl=False, park=False)
    x = torch.zeros(M, kw.in_features, dtype=torch.float16, device=device)
    return cfg, ops.plan_matmul(x, kw, cfg)


def _arg_specs(plan: ops.MatmulLaunch) -> list[dict]:
    """How the JIT specialises each runtime argument: pointers 16-byte aligned, ints == 1 folded
    into constants, ints divisible by 16 marked so (Triton's default specialisation)."""
    names = [n for i, n in enumerate(plan.kernel.arg_names) if i not in plan.kernel.constexprs]
    specs = []
    for name, a in zip(names, plan.args):
        if isinstance(a, torch.Tensor):
            specs.append({"name": name, "type": _PTR_TYPES[a.dtype], "div16": a.data_ptr() % 16 == 0})
        else:
            specs.append({"name": name, "type": "i32", "value": int(a), "const": a == 1, "div16": a % 16 == 0})
    return specs


def _empty_kw(K: int, N: int, G: int) -> KernelWeight:
    """A kernel-layout weight of the right shapes and dtypes (values do not matter for compiling)."""
    return KernelWeight(qw=torch.zeros(K // 8, N, dtype=torch.int32), scales=torch.zeros(K // G, N, dtype=torch.float16),
                        zeros=torch.zeros(K // G, N, dtype=torch.uint8), bias=None, in_features=K, group_size=G,
                        splits=(N,))


def compile_all(out: str, sms: int, Ms: list[int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpu_kernels import G, SHAPES

    # plan as on the GPU: its SM count and the inline-PTX kernels (this CPU build of torch has no CUDA)
    ops._n_sm = lambda device: sms
    ops._PTX = True
    os.makedirs(out, exist_ok=True)
    manifest = {"triton": triton.__version__, "sms": sms, "entries": []}
    for shape, (K, N) in SHAPES.items():
        kw = _empty_kw(K, N, G)
        for M in Ms:
            cfg, plan = _plan(M, kw, torch.device("cpu"))
            specs = _arg_specs(plan)
            constexprs = {k: v for k, v in plan.meta.items() if k not in _LAUNCH_KEYS}
            constexprs.update({s["name"]: 1 for s in specs if s.get("const")})
            for prm in plan.kernel.params:  # constexprs left at their defaults (USE_PDL, ...)
                if prm.is_constexpr and prm.name not in constexprs:
                    constexprs[prm.name] = prm.default
            sig = {s["name"]: ("constexpr" if s.get("const") else s["type"]) for s in specs}
            sig.update({k: "constexpr" for k in constexprs})
            index = {n: i for i, n in enumerate(plan.kernel.arg_names)}
            attrs = {(index[s["name"]],): [["tt.divisibility", 16]] for s in specs if s["div16"] and not s.get("const")}
            src = ASTSource(fn=plan.kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            t0 = time.time()
            c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": plan.meta["num_warps"], "num_stages": plan.meta["num_stages"]})
            entry_ptx = re.search(r"\.entry\s+\w+\s*\((.*?)\)", c.asm["ptx"], re.S).group(1)
            key = f"{shape}_m{M}"
            with open(os.path.join(out, key + ".cubin"), "wb") as f:
                f.write(c.asm["cubin"])
            md = c.metadata._asdict()
            manifest["entries"].append({
                "key": key, "shape": shape, "K": K, "N": N, "M": M, "config": asdict(cfg), "grid": list(plan.grid),
                "args": specs, "constexprs": constexprs, "name": md["name"], "shared": md["shared"],
                "num_warps": md["num_warps"], "n_params": entry_ptx.count(".param"),
                "scratch": [md.get("global_scratch_size", 0), md.get("profile_scratch_size", 0)]})
            print(f"{key}: {cfg.kind} grid {plan.grid} shared {md['shared']} ({time.time() - t0:.1f} s)", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


class Driver:
    """The few CUDA driver calls needed to load a cubin and launch it on torch's current stream."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.modules = []

    def check(self, res: int, what: str) -> None:
        if res:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(res, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA error {res} ({msg.value.decode() if msg.value else '?'})")

    def load(self, path: str, name: str, shared: int) -> ctypes.c_void_p:
        image = open(path, "rb").read()
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(image)), f"load {path}")
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"function {name}")
        if shared > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.lib.cuFuncSetAttribute(fn, 8, shared), "dynamic shared memory")
        self.modules.append(mod)
        return fn

    def launch(self, fn, grid, threads: int, shared: int, params: list) -> None:
        holders = [ctypes.c_void_p(p) if kind == "ptr" else ctypes.c_int32(p) for kind, p in params]
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self.check(self.lib.cuLaunchKernel(fn, *grid, threads, 1, 1, shared, stream, argv, None), "launch")


def run_all(d: str, out: str) -> None:
    import triton

    from gpu_kernels import SHAPES, make_set, rel_err, time_graph

    man = json.load(open(os.path.join(d, "manifest.json")))
    dev = torch.device("cuda")
    drv = Driver()
    torch.zeros(1, device=dev)  # the primary context is current from here on
    info = {"device": torch.cuda.get_device_name(0), "jit_triton": triton.__version__, "aot_triton": man["triton"],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    rows = []
    for shape, (K, N) in SHAPES.items():
        entries = [e for e in man["entries"] if e["shape"] == shape]
        if not entries:
            continue
        R = max(2, math.ceil(400e6 / (K * N * 2)))
        sets = [make_set(K, N) for _ in range(R)]
        kws = [KernelWeight.from_packed(st["p"]) for st in sets]
        for e in entries:
            M = e["M"]
            cfg, plan = _plan(M, kws[0], dev)
            specs = _arg_specs(plan)
            same = (asdict(cfg) == e["config"] and list(plan.grid) == e["grid"]
                    and [s for s in specs if s["type"] == "i32"] == [s for s in e["args"] if s["type"] == "i32"])
            if not same:
                print(f"{e['key']}: the cubin was planned differently (SM count?); skipped", flush=True)
                continue
            fn = drv.load(os.path.join(d, e["key"] + ".cubin"), e["name"], e["shared"])
            if any(e["scratch"]):
                print(f"{e['key']}: needs global scratch {e['scratch']}; not supported here", flush=True)
                continue

            def aot(x, kw, e=e, fn=fn):
                p = ops.plan_matmul(x, kw, cfg)
                params = [("ptr", a.data_ptr()) if isinstance(a, torch.Tensor) else ("int", int(a))
                          for a, s in zip(p.args, e["args"]) if not s.get("const")]
                params += [("ptr", 0)] * (e["n_params"] - len(params))  # global / profile scratch: unused
                drv.launch(fn, p.grid, 32 * e["num_warps"], e["shared"], params)
                return p.y

            def jit(x, kw):
                return ops.w4_matmul(x, kw, cfg)

            x = torch.randn(M, K, dtype=torch.float16, device=dev)
            for label, call in (("jit", jit), ("aot", aot)):
                y = call(x, kws[0])
                err = rel_err(y, x, sets[0]["W"])
                stable = torch.equal(call(x, kws[0]), y)
                ok = err < 1e-2 and stable
                us = time_graph(lambda: [call(x, kw) for kw in kws], R)[0] if ok else float("nan")
                row = dict(shape=shape, M=M, build=label, kind=cfg.kind, us=round(us, 2), rel_err=float(f"{err:.2e}"),
                           stable=stable, ok=ok)
                if label == "aot":
                    row["max_abs_vs_jit"] = (y.float() - jit(x, kws[0]).float()).abs().max().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
        del sets, kws
        torch.cuda.empty_cache()
    with open(os.path.join(out, "gpu_aot_triton.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print("\none layer's four linears, us (PDL off in both):  M   Triton " + info["jit_triton"] + " (JIT)   "
          + man["triton"] + " (cubin)")
    for M in sorted({r["M"] for r in rows}):
        t = {b: sum(r["us"] for r in rows if r["M"] == M and r["build"] == b and r["ok"]) for b in ("jit", "aot")}
        n = {b: sum(1 for r in rows if r["M"] == M and r["build"] == b and r["ok"]) for b in ("jit", "aot")}
        if n["jit"] == n["aot"] == len(SHAPES):
            print(f"{M:>52} {t['jit']:12.1f} {t['aot']:14.1f}  ({t['jit'] / t['aot']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile the default kernels with this machine's Triton (no GPU needed)")
    c.add_argument("--out", default="build/aot")
    c.add_argument("--sms", type=int, default=132, help="SM count of the target GPU (H100 SXM: 132)")
    c.add_argument("--ms", default=",".join(map(str, MS)), type=lambda v: [int(m) for m in v.split(",")])
    r = sub.add_parser("run", help="on the GPU: time the installed Triton's JIT build beside the cubins")
    r.add_argument("--dir", default="build/aot")
    r.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    if a.cmd == "compile":
        compile_all(a.out, a.sms, a.ms)
    else:
        run_all(a.dir, a.out)


if __name__ == "__main__":
    main()
