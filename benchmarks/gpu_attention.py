"""Single-token attention on a GPU: awqconv's split-KV kernel (kernels/decode_attention.py) against
torch SDPA, Llama-2-7B heads (32 x 128, batch 1), over 32 layers' distinct caches (so the cache is
read from HBM, not L2), in one CUDA graph; us per layer and the cache read rate.
Variants: cache slots per slice; the fused RoPE + cache write + attention kernel with and without
early cache reads (before the PDL wait; here the previous kernel is the previous layer's attention).
Usage: python benchmarks/gpu_attention.py [--ctx 256,512,1024,2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.kernels.decode_attention import decode_attention, rope_decode_attention  # noqa: E402
from gpu_kernels import time_graph  # noqa: E402

DEV = torch.device("cuda")
H, D, LAYERS, MAX_LEN = 32, 128, 32, 2112


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", default="256,512,1024,2048")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    torch.manual_seed(0)
    kcs = [torch.randn(1, H, MAX_LEN, D, dtype=torch.float16, device=DEV) for _ in range(LAYERS)]
    vcs = [torch.randn(1, H, MAX_LEN, D, dtype=torch.float16, device=DEV) for _ in range(LAYERS)]
    rows = []
    for S in (int(c) for c in a.ctx.split(",")):
        bias = torch.zeros(1, 1, 1, S, dtype=torch.float16, device=DEV)
        slot = torch.tensor([S - 1], device=DEV)
        q = torch.randn(1, H, 1, D, dtype=torch.float16, device=DEV)
        variants = {"sdpa": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)}
        qkv = torch.randn(1, 1, 3 * H * D, dtype=torch.float16, device=DEV)
        qs, ks, vs = qkv.split(H * D, -1)
        cos = torch.ones(1, 1, 1, D, dtype=torch.float16, device=DEV)
        sin = torch.zeros(1, 1, 1, D, dtype=torch.float16, device=DEV)  # identity rotation: same reference
        for slice_ in (32, 64, 128):
            n = -(-S // slice_)
            variants[f"awq_slice{slice_}"] = lambda k, v, n=n: decode_attention(q, k, v, bias, n, max_split=64)
            for early in (False, True):
                variants[f"awq_rope_slice{slice_}" + ("_early" if early else "")] = (
                    lambda k, v, n=n, early=early: rope_decode_attention(qs, ks, vs, cos, sin, k, v, slot, bias, H,
                                                                         n, early, max_split=64))
        for name, fn in variants.items():
            out = fn(kcs[0][:, :, :S], vcs[0][:, :, :S])
            qq = q if "rope" not in name else qs.view(1, H, 1, D)  # the fused kernel reads raw QKV rows
            ref = F.scaled_dot_product_attention(qq.float(), kcs[0][:, :, :S].float(), vcs[0][:, :, :S].float(),
                                                 attn_mask=bias.float())
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = time_graph(lambda fn=fn: [fn(k[:, :, :S], v[:, :, :S]) for k, v in zip(kcs, vcs)], LAYERS)[0]
            row = {"ctx": S, "method": name, "us_per_layer": round(us, 2), "rel_err": float(f"{err:.1e}"),
                   "TBps": round(2 * H * S * D * 2 / (us * 1e-6) / 1e12, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(os.path.join(a.out, "gpu_attention.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
