"""Single-token attention on a GPU: awqconv's split-KV kernel (kernels/decode_attention.py) against
torch SDPA, Llama-2-7B heads (32 x 128, batch 1), over 32 layers' distinct caches (so the cache is
read from HBM, not L2), in one CUDA graph; us per layer and the cache read rate.
Rows: SDPA, the default, cache slots per slice with and without early cache reads (before the PDL
wait; here the previous kernel is the previous layer's attention), and the default with this step's
slot at 15/16 of the cache (the mean of a power-of-two bucket's second half: only the slots up to it
are read, "slot15_16").
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
from gpu_kernels import time_graph

from awqconv.kernels.decode_attention import decode_attention

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
        variants["awq_default"] = lambda k, v: decode_attention(q, k, v, bias, slot=slot)
        for slice_ in (32, 64, 128):
            n = -(-S // slice_)
            for early in (False, True):
                variants[f"awq_slice{slice_}" + ("_early" if early else "")] = (
                    lambda k, v, n=n, early=early: decode_attention(q, k, v, bias, n, slot, early))
        now = S - S // 16
        bias_now = torch.zeros(1, 1, 1, S, dtype=torch.float16, device=DEV)
        bias_now[..., now + 1:] = float("-inf")
        slot_now = torch.tensor([now], device=DEV)

        variants["slot15_16"] = lambda k, v, q=q, b=bias_now, s=slot_now: decode_attention(q, k, v, b, slot=s)
        for name, fn in variants.items():
            out = fn(kcs[0][:, :, :S], vcs[0][:, :, :S])
            ref = F.scaled_dot_product_attention(q.float(), kcs[0][:, :, :S].float(), vcs[0][:, :, :S].float(),
                                                 attn_mask=(bias_now if name.startswith("slot") else bias).float())
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
