"""GPU correctness of the runtime: tiny random Llama / Qwen2-style models, greedy tokens of awqconv's
runtime (Triton INT4 linears, CUDA graphs) against the fake-quant transformers reference on the GPU,
for a batch of two prompts and for the first prompt alone (one-row decode kernels); and the
transposed tile's asm dequantisation checked bit for bit (one-hot rows of x return rows of W); the
one-row fp16x2 GEMV's inline PTX (fp16 and bf16 activations) bit for bit against its plain-Triton
emulation (the form the CPU tests check); streamed decoding with an EOS returns the same tokens;
seeded GPU sampling repeats, streams what it returns, and with a one-token nucleus decodes greedily.
Usage: python benchmarks/gpu_runtime_check.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ["TRITON_INTERPRET"] = "0"  # the tests' conftest (imported below) turns the interpreter on
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import tiny_llama_qm

from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import KernelConfig, w4_matmul
from awqconv.packed import PackedLinear
from awqconv.reference import reference_model
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.model import build_decoder


def tile_t_exact() -> list[dict]:
    """x = one-hot rows picking 16 input rows k: y must equal those rows of the dequantised W exactly
    (the asm's (q - z) * s is rounded once; one product per output), for each dtype and variant."""
    g = torch.Generator().manual_seed(0)
    N, K, G = 200, 1024, 128
    rows = []
    for dt in (torch.float16, torch.bfloat16):
        p = PackedLinear(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
                         (torch.rand(N, K // G, generator=g) * 0.02 + 1e-3).to(dt),
                         torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g), K, G)
        kw = KernelWeight.from_packed(p).to("cuda")
        W = p.dequantize(dt).t().cuda()
        for k0 in range(0, K, 16 * 7):
            ks = torch.arange(k0, k0 + 16 * 7, 7).clamp(max=K - 1).cuda()
            x = torch.zeros(16, K, dtype=dt, device="cuda")
            x[torch.arange(16), ks] = 1
            for cfg in (KernelConfig("tile_t", 16, 64, 64, -8, 4, 1, prefetch=1),
                        KernelConfig("tile_t", 16, 128, 128, 3, 8, 1, prefetch=0)):
                y = w4_matmul(x, kw, cfg)
                rows.append({"dtype": str(dt), "k0": k0, "cfg": f"bn{cfg.block_n}_kc{cfg.kc}",
                             "exact": bool(torch.equal(y, W[ks]))})
    bad = [r for r in rows if not r["exact"]]
    print(json.dumps({"tile_t_exact": len(rows) - len(bad), "of": len(rows), "first_bad": bad[:3]}), flush=True)
    return rows


def gemv_asm_exact() -> list[dict]:
    """The fp16x2 GEMV with its inline PTX and with its plain-Triton emulation (USE_ASM off) must give
    the same bits, for fp16 and bf16 rows of ordinary, tiny and (bf16) beyond-fp16 magnitudes."""
    from awqconv.kernels import ops

    g = torch.Generator().manual_seed(1)
    rows = []
    # largest |x| ~ 4.5 amp: bf16 1e5 is past fp16's range, under 2^20; fp16 2e3 keeps the outputs
    # (up to ~1e5 |x| s) inside fp16
    for dt, amps in ((torch.float16, (1.0, 1e-3, 2e3)), (torch.bfloat16, (1.0, 1e-3, 1e5))):
        for N, K, G in ((200, 1024, 128), (4096, 4096, 128), (96, 11008, 64)):
            p = PackedLinear(torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g),
                             (torch.rand(N, K // G, generator=g) * 0.02 + 1e-3).to(dt),
                             torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g), K, G)
            kw = KernelWeight.from_packed(p).to("cuda")
            cfg = KernelConfig("gemv_f16x2", 1, 64, 64, -16, 2, 2)
            for amp in amps:
                x = (torch.randn(1, K, generator=g) * amp).to(dt).cuda()
                y = w4_matmul(x, kw, cfg)
                ops._PTX = False
                try:
                    y_emul = w4_matmul(x, kw, cfg)
                finally:
                    ops._PTX = True
                rows.append({"dtype": str(dt), "NK": [N, K], "amp": amp, "exact": bool(torch.equal(y, y_emul)),
                             "n_diff": int((y != y_emul).sum()),
                             "max_rel_diff": ((y.float() - y_emul.float()).abs().max() / y.float().abs().max()).item(),
                             "finite": bool(torch.isfinite(y).all())})
    bad = [r for r in rows if not (r["exact"] and r["finite"])]
    print(json.dumps({"gemv_asm_exact": len(rows) - len(bad), "of": len(rows), "bad": bad}), flush=True)
    return rows


def main() -> None:
    out = [{"tile_t_exact": all(r["exact"] for r in tile_t_exact())},
           {"gemv_asm_exact": all(r["exact"] and r["finite"] for r in gemv_asm_exact())}]
    # head_dim 64: one-row steps take the fused QKV + RoPE kernel (fp16, and bf16 through x / 16)
    for kw in [dict(group_size=32), dict(group_size=64, attention_bias=True), dict(group_size=32, scale_dtype=torch.bfloat16),
               dict(group_size=32, head_dim=64), dict(group_size=32, head_dim=64, scale_dtype=torch.bfloat16)]:
        qm = tiny_llama_qm(**kw)
        dt = qm.dtype
        ref = reference_model(qm, dtype=torch.float32).cuda()
        dec = build_decoder(qm, "cuda")
        prompts = [[1, 5, 9, 33, 2, 7, 7], [100, 3, 4]]
        res = Generator(dec, max_batch=2, max_len=256).generate(prompts, SamplingParams(max_new_tokens=40))
        one = Generator(dec, max_batch=1, max_len=256).generate(prompts[:1], SamplingParams(max_new_tokens=40))
        # streamed + EOS (tokens read on the host while the next step is already queued): the same tokens,
        # stopping at (and including) the EOS
        eos = one.tokens[0][20]
        seen = []
        st = Generator(dec, max_batch=1, max_len=256).generate(
            prompts[:1], SamplingParams(max_new_tokens=40, eos_token_ids=(eos,)), stream=lambda r, t: seen.append(t))
        want = one.tokens[0][: one.tokens[0].index(eos) + 1]
        stream_ok = st.tokens[0] == want and seen == want
        # sampled on the GPU (kernels/sample.py): a seed repeats its draws, the stream carries them, and a
        # nucleus of one token (top-p 1e-6) is greedy decoding
        g1 = Generator(dec, max_batch=1, max_len=256)
        sp = SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=7)
        seen_s = []
        s1 = g1.generate(prompts[:1], sp, stream=lambda r, t: seen_s.append(t)).tokens[0]
        s2 = g1.generate(prompts[:1], sp).tokens[0]
        s3 = g1.generate(prompts[:1], SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=8)).tokens[0]
        narrow = g1.generate(prompts[:1], SamplingParams(max_new_tokens=40, temperature=0.8, top_p=1e-6, seed=7))
        sample_ok = {"seed_repeats": s1 == s2, "streamed": seen_s == s1, "other_seed_differs": s3 != s1,
                     "top_p_tiny_is_greedy": narrow.tokens[0] == one.tokens[0]}
        nd = next((i for i, (a, b) in enumerate(zip(narrow.tokens[0], one.tokens[0])) if a != b), None)
        if nd is not None:  # a tie of the runtime's own top-2 logits there keeps both in any nucleus
            g1.generate([prompts[0] + one.tokens[0][:nd]], SamplingParams(max_new_tokens=1))
            lg, _, _ = g1.prefill([prompts[0] + one.tokens[0][:nd]])
            top2 = lg[0].float().topk(2)
            sample_ok["first_diff"] = nd
            sample_ok["own_top2"] = [top2.values.tolist(), top2.indices.tolist()]
            sample_ok["tokens_there"] = [narrow.tokens[0][nd], one.tokens[0][nd]]
        agree = []
        for p, r in zip(prompts + prompts[:1], res.tokens + one.tokens):  # a batch of two, then one row alone
            o = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=40, min_new_tokens=40, do_sample=False)
            rt = o[0, len(p):].tolist()
            first_diff = next((i for i, (a, b) in enumerate(zip(r, rt)) if a != b), None)
            entry = {"match": r == rt, "first_diff": first_diff}
            if first_diff is not None:  # the reference's own margin there: a near-tie, or a real difference?
                with torch.no_grad():
                    lg = ref(torch.tensor([p + rt[:first_diff]], device="cuda")).logits[0, -1].float()
                top2 = lg.topk(2).values
                entry["ref_margin"] = (top2[0] - top2[1]).item()
                entry["ours_is_ref_second"] = int(lg.topk(2).indices[1]) == r[first_diff]
            agree.append(entry)
        ids = torch.tensor([prompts[0]], device="cuda")
        dec.allocate_cache(2, 256)
        with torch.no_grad():
            l = dec(ids, torch.arange(ids.shape[1], device="cuda")[None], torch.tensor(0, device="cuda"), ids.shape[1], last_only=False).float()
            lr = ref(ids).logits.float()
        row = {"case": {k: str(v) for k, v in kw.items()}, "dtype": str(dt), "greedy": agree, "stream_eos_ok": stream_ok,
               "sample": sample_ok,
               "max_abs_dlogit": (l - lr).abs().max().item(), "logit_absmax": lr.abs().max().item()}
        print(json.dumps(row), flush=True)
        out.append(row)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_runtime_check.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
