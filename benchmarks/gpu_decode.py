"""End-to-end batch-1 decode of a Llama-2-7B-shaped random-weight INT4 model with awqconv's runtime.

Builds a QuantizedModel of random canonical integers (g128, fp16 scales) directly on the GPU, loads it
into the built-in runtime (fused QKV / gate-up Triton INT4 linears, CUDA-graphed decode step), checks
its logits against the same runtime with dequantised fp16 weights, then times greedy decode: 64-token
prompt + 256 new tokens, and a 1792-token prompt + 256 new tokens (2048 context). Optionally the
fp16 path of the same runtime (``--fp16``) for the speedup over float weights. Prints tok/s and peak memory.
Usage: python benchmarks/gpu_decode.py [--fp16] [--options pdl=0,head_gemv=0] [--pdl-compare] [--prologue-compare]
       [--argmax-compare] [--head-compare] [--stage-compare] [--early-compare] [--fused-compare] [--batch 4,8]
       [--layers 32] [--profile [--profile-prompt N]] [--pending-compare] [--skip-compare] [--merge-blocks 64,512]
       [--bf16 [--x16-compare]] [--host-compare] [--device cuda]
(--bf16: bf16 scales, so the runtime runs bf16 activations. --options: RuntimeOptions for every run,
``name=value`` pairs, e.g. ``pdl=0`` for a profile without programmatic dependent launch; each
--*-compare run turns one option or path off on top of them.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from awqconv.config import QuantConfig
from awqconv.errors import UsageError
from awqconv.model import QuantizedModel
from awqconv.packed import PackedLinear
from awqconv.runtime import decode_chain
from awqconv.runtime import generate as gen_mod
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.model import build_decoder
from awqconv.runtime.options import RuntimeOptions

_SAMPLE = gen_mod._sample

DEV = torch.device("cuda")  # --device
G = 128


def parse_options(spec: str) -> RuntimeOptions:
    """``--options`` for argparse: ``RuntimeOptions.parse`` with its error as a usage error."""
    try:
        return RuntimeOptions.parse(spec)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def llama2_7b_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}


def random_qm(layers: int, dtype: torch.dtype = torch.float16) -> QuantizedModel:
    cfg = llama2_7b_config(layers)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    linears, dense = {}, {}
    for i in range(layers):
        for n, (out, k) in shapes.items():
            # scales ~ 1/(8 sqrt(k)) keep activations O(1) through the random network
            s = (torch.rand(out, k // G, device=DEV) * 0.5 + 0.75) / (8 * k ** 0.5)
            linears[f"model.layers.{i}.{n}"] = PackedLinear(
                torch.randint(0, 256, (out, k // 2), dtype=torch.uint8, device=DEV), s.to(dtype),
                torch.randint(7, 9, (out, k // G), dtype=torch.uint8, device=DEV),
                k, G)
        dense[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=dtype, device=DEV)
        dense[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype, device=DEV)
    dense["model.embed_tokens.weight"] = (torch.randn(cfg["vocab_size"], h, device=DEV) * 0.5).to(dtype)
    dense["model.norm.weight"] = torch.ones(h, dtype=dtype, device=DEV)
    dense["lm_head.weight"] = (torch.randn(cfg["vocab_size"], h, device=DEV) / h ** 0.5).to(dtype)
    return QuantizedModel(hf_config=cfg, quant_config=QuantConfig(method="rtn"), linears=linears, dense=dense)


def run_decode(dec, label: str, prompt_len: int, new: int, max_len: int, batch: int = 1,
               host: str = "none") -> dict:
    """Greedy decode of ``batch`` random prompts; tok/s counts every row's tokens. ``host``: "none"
    (tokens stay on the GPU until the end), "stream" (every token goes to a streaming callback and
    is checked against an EOS id, as `awqconv chat` does; the id is outside the vocabulary, so no
    row stops early), "sample" (the same, sampled at temperature 0.7, top-p 0.9), "sample_sorted"
    (the same through the sort-based torch sampler the one-kernel sampler replaced)."""
    gen = Generator(dec, max_batch=batch, max_len=max_len)
    prompts = [torch.randint(0, 32000, (prompt_len,)).tolist() for _ in range(batch)]
    extra = {"none": {}, "stream": {"eos_token_ids": (32000,)},
             "sample": {"eos_token_ids": (32000,), "temperature": 0.7, "top_p": 0.9}}[host.replace("_sorted", "")]
    if host == "sample_sorted":
        gen_mod._sample = lambda logits, p, g: logits.argmax(-1) if p.temperature <= 0 else gen_mod._sample_torch(
            logits, p, g)
    p = SamplingParams(max_new_tokens=new, **extra)
    callback = (lambda row, tok: None) if host != "none" else None
    gen.generate(prompts, SamplingParams(max_new_tokens=8))  # warm-up: compile, capture
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = None
    for _ in range(2):
        res = gen.generate(prompts, p, stream=callback)
        if best is None or res.decode_s < best.decode_s:
            best = res
    r = {"label": label + ("" if host == "none" else f"_host_{host}"), "batch": batch, "prompt": prompt_len, "new": new, "ctx_end": prompt_len + new,
         "decode_tok_s": round(batch * best.decode_steps / best.decode_s, 1),
         "ms_per_step": round(best.decode_s / best.decode_steps * 1e3, 3),
         "prefill_tok_s": round(batch * prompt_len / best.prefill_s, 1),
         "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    print(json.dumps(r), flush=True)
    return r


def profile_decode(dec, out: str, prompt_len: int = 64) -> None:
    """Per-kernel GPU time over 64 graph-replayed decode steps after a ``prompt_len`` prompt (the
    prefill's kernels are in the table too), printed and saved."""
    from torch.profiler import ProfilerActivity, profile

    gen = Generator(dec, max_batch=1, max_len=2048)
    prompt = torch.randint(0, 32000, (prompt_len,)).tolist()
    gen.generate([prompt], SamplingParams(max_new_tokens=8))  # compile and capture first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.generate([prompt], SamplingParams(max_new_tokens=64))
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    print(table, flush=True)
    with open(os.path.join(out, f"decode_profile_p{prompt_len}.txt"), "w") as f:
        f.write(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--fp16", action="store_true", help="also time the runtime with dequantised fp16 weights")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--profile", action="store_true", help="only: kernel-time table of 64 decode steps")
    ap.add_argument("--profile-prompt", type=int, default=64, help="prompt length before the profiled steps")
    ap.add_argument("--options", default="", type=parse_options,
                    help="RuntimeOptions for every run, name=value pairs: pdl, dequant_min_m, x16, pending_norm, "
                         "decode_prologue, head_gemv (e.g. pdl=0)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pdl-compare", action="store_true",
                    help="also time 64 + 256 with programmatic dependent launch turned off")
    ap.add_argument("--stage-compare", action="store_true",
                    help="also time with each step's token, position and slot staged by torch ops")
    ap.add_argument("--head-compare", action="store_true", help="also time with the lm_head on cuBLAS (F.linear)")
    ap.add_argument("--argmax-compare", action="store_true", help="also time greedy decoding with torch's argmax")
    ap.add_argument("--prologue-compare", action="store_true",
                    help="also time with the step's mask, RoPE rows and embedding built by torch (not one kernel)")
    ap.add_argument("--early-compare", action="store_true",
                    help="also time with the attention's early cache reads off, and on at every length")
    ap.add_argument("--batch", default=None, type=lambda v: [int(b) for b in v.split(",")],
                    help="also decode these batch sizes (64 + 256 and 1792 + 256 per row)")
    ap.add_argument("--skip-compare", action="store_true",
                    help="what each step costs in the chain: decode with the add + RMSNorm kernels, the "
                         "attention, or both left out (wrong tokens, timing only)")
    ap.add_argument("--merge-blocks", default=None, type=lambda v: [int(b) for b in v.split(",")],
                    help="also time 2048-context decode with these columns per program in the residual and "
                         "SiLU merge kernels (gemv_fused.RESIDUAL_BLOCK, SILU_BLOCK)")
    ap.add_argument("--pending-compare", action="store_true",
                    help="also time the decode with the RMSNorms as kernels of their own (no PendingNorm)")
    ap.add_argument("--fused-compare", action="store_true",
                    help="also time with the fused one-row epilogues (QKV + RoPE, gate/up + SiLU) turned off")
    ap.add_argument("--host-compare", action="store_true",
                    help="also time 64 + 256 with every token read on the host (streaming + EOS check), greedy "
                         "and sampled")
    ap.add_argument("--bf16", action="store_true", help="bf16 scales and activations (default fp16)")
    ap.add_argument("--x16-compare", action="store_true",
                    help="with --bf16: also time with the GEMV inputs handed over as bf16 (no X16; the GEMV converts)")
    a = ap.parse_args()
    global DEV
    DEV = torch.device(a.device)
    torch.manual_seed(0)
    t0 = time.time()
    qm = random_qm(a.layers, torch.bfloat16 if a.bf16 else torch.float16)
    opts = a.options
    dec = build_decoder(qm, DEV, options=opts)
    wbytes = sum(p.qweight.numel() + p.scales.numel() * 2 + p.zeros.numel() for p in qm.linears.values())
    print(f"built in {time.time() - t0:.1f}s; int4 linear bytes {wbytes / 1e9:.2f} GB; "
          f"allocated {torch.cuda.memory_allocated() / 1e9:.2f} GB", flush=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dtype": str(qm.dtype),
               "options": opts.changed(), "runs": []}
    # correctness: INT4 runtime vs the same runtime on dequantised fp16 weights, one prefill
    ids = torch.randint(0, 32000, (1, 32), device=DEV)
    pos = torch.arange(32, device=DEV)[None]
    dec.allocate_cache(1, 64)
    with torch.no_grad():
        l4 = dec(ids, pos, torch.tensor(0, device=DEV), 32, last_only=False).float()
    ref = build_decoder(qm, DEV, mode="dense", options=opts) if a.fp16 else None
    if ref is not None:
        ref.allocate_cache(1, 64)
        with torch.no_grad():
            lr = ref(ids, pos, torch.tensor(0, device=DEV), 32, last_only=False).float()
        chk = {"max_abs_dlogit": (l4 - lr).abs().max().item(), "logit_scale": lr.abs().max().item(),
               "top1_agree": (l4.argmax(-1) == lr.argmax(-1)).float().mean().item()}
        print("check vs fp16 dense:", json.dumps(chk), flush=True)
        results["check"] = chk
    if a.profile:
        profile_decode(dec, a.out, a.profile_prompt)
        return
    results["runs"].append(run_decode(dec, "awqconv_int4", 64, 256, 2048))
    results["runs"].append(run_decode(dec, "awqconv_int4", 1792, 256, 2048))
    for b in a.batch or []:
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4", n, 256, 2048, batch=b))
    if a.early_compare:  # attention reading the cache only after the PDL wait, or early at every length
        from awqconv.kernels import decode_attention as attn

        keep = attn.EARLY_MAX_S  # read at every launch; a new Generator recaptures
        for label, limit in (("late_kv", 0), ("early_kv_always", 1 << 30)):
            attn.EARLY_MAX_S = limit
            for n in (64, 1792):
                results["runs"].append(run_decode(dec, "awqconv_int4_" + label, n, 256, 2048))
        attn.EARLY_MAX_S = keep
    if a.argmax_compare:  # greedy tokens by torch's argmax (one block per row) instead of the split kernel
        keep = gen_mod._sample
        gen_mod._sample = lambda logits, p, g: logits.argmax(-1) if p.temperature <= 0 else keep(logits, p, g)
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_torch_argmax", n, 256, 2048))
        gen_mod._sample = keep
    if a.stage_compare:  # each step's inputs staged by torch ops (the path before the staging kernel)
        keep = Generator.step

        def step_torch(self, tok, pos, slot, history=None):
            g, t_buf, p_buf, s_buf, logits = self._graph_for(tok.shape[0], self.kv_bucket(slot))
            t_buf.copy_(tok.view(t_buf.shape))
            p_buf.copy_(pos.view(p_buf.shape))
            s_buf.fill_(slot)
            if history is not None:
                history.copy_(tok)
            g.replay()
            return logits[:, -1], pos + 1
        Generator.step = step_torch
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_torch_staging", n, 256, 2048))
        Generator.step = keep
    if a.head_compare:
        dec.set_options(replace(opts, head_gemv=False))  # read at every forward: a new Generator recaptures
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_cublas_head", n, 256, 2048))
        dec.set_options(opts)
    if a.prologue_compare:
        dec.set_options(replace(opts, decode_prologue=False))  # read at every forward: a new Generator recaptures
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_torch_prologue", n, 256, 2048))
        dec.set_options(opts)
    if a.fused_compare:  # the same decode with a fused one-row epilogue kernel (gemv_fused.py) turned off
        keep = {name: getattr(decode_chain, name) for name in ("qkv_rope", "gate_up_silu")}
        for off, lengths in ((("qkv_rope",), (1792,)), (("gate_up_silu",), (1792,)),
                             (("qkv_rope", "gate_up_silu"), (64, 1792))):
            for name in off:  # None: "does not apply", so the separate kernels run
                setattr(decode_chain, name, lambda *args, **kw: None)
            for n in lengths:
                results["runs"].append(run_decode(dec, "awqconv_int4_without_" + "+".join(off), n, 256, 2048))
            for name, fn in keep.items():
                setattr(decode_chain, name, fn)
    if a.merge_blocks:  # read at every launch: a new Generator recaptures
        from awqconv.kernels import gemv_fused

        keep = (gemv_fused.RESIDUAL_BLOCK, gemv_fused.SILU_BLOCK)
        for b in a.merge_blocks:
            for which in ("RESIDUAL_BLOCK", "SILU_BLOCK"):
                setattr(gemv_fused, which, b)
                results["runs"].append(run_decode(dec, f"awqconv_int4_{which.lower()}_{b}", 1792, 256, 2048))
                setattr(gemv_fused, which, keep[0] if which == "RESIDUAL_BLOCK" else keep[1])
    if a.pending_compare:
        dec.set_options(replace(opts, pending_norm=False))  # read at every forward: a new Generator recaptures
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_norm_kernels", n, 256, 2048))
        dec.set_options(opts)
    if a.skip_compare:  # timing only: a left-out step hands its input on unchanged (fp16 decode)
        from awqconv.runtime.layer_ops import StepPaths

        keep = (StepPaths.add_norm, decode_chain.attention)
        dec.set_options(replace(opts, pending_norm=False))  # the norms as kernels of their own
        skips = {"add_norm": lambda: setattr(StepPaths, "add_norm", lambda self, x, r, w, eps, x16=False: (x, r)),
                 "attention": lambda: setattr(decode_chain, "attention", lambda q, *args: q)}
        for off in (("add_norm",), ("attention",), ("add_norm", "attention")):
            for name in off:
                skips[name]()
            for n in (64, 1792):
                results["runs"].append(run_decode(dec, "awqconv_int4_without_" + "+".join(off), n, 256, 2048))
            StepPaths.add_norm, decode_chain.attention = keep
        dec.set_options(opts)
    if a.host_compare:
        for host in ("stream", "sample", "sample_sorted"):
            results["runs"].append(run_decode(dec, "awqconv_int4", 64, 256, 2048, host=host))
        gen_mod._sample = _SAMPLE
    if a.x16_compare:  # each one-row GEMV converts its bf16 input itself
        dec.set_options(replace(opts, x16=False))  # read at every forward: a new Generator recaptures
        for n in (64, 1792):
            results["runs"].append(run_decode(dec, "awqconv_int4_no_x16", n, 256, 2048))
        dec.set_options(opts)
    if a.pdl_compare:  # a new Generator captures its graphs without PDL
        dec.set_options(replace(opts, pdl=False))
        results["runs"].append(run_decode(dec, "awqconv_int4_no_pdl", 64, 256, 2048))
        dec.set_options(opts)
    if ref is not None:
        del dec
        dec = None
        torch.cuda.empty_cache()
        results["runs"].append(run_decode(ref, "awqconv_fp16_dense", 64, 256, 2048))
    with open(os.path.join(a.out, "gpu_decode.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results["runs"]))


if __name__ == "__main__":
    main()
