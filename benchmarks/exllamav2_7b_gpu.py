"""ExLlamaV2 vs awqconv's runtime on a Llama-2-7B-shaped random INT4 model (GPU; --dry-run on the CPU).

Seeded random weights are generated and RTN-packed (4 bit, g=128) one linear at a time on the device,
with ~1 % of (row, group) zero points forced to 0; awqconv.formats.exllamav2 writes the export,
ExLlamaV2 0.3.2 loads it (its JIT build runs in a child process while the model is built), and both
run fixed token-id prompts: max |dlogit|, logit scale and top-1 agreement over all positions.
    python benchmarks/exllamav2_7b_gpu.py [--layers 32] [--kv-heads 32]   # -> $OUT/exllamav2_7b_gpu.json
    python benchmarks/exllamav2_7b_gpu.py --dry-run    # CPU: 2 layers, hidden 256, our runtime vs HF only
--trace (GPU) explains where ExLlamaV2 departs from the fp32 reference on the longest prompt: hidden
states after every attention/MLP block at the worst position vs the median one, and each of its 224
linears fed the reference's own (fp16-rounded) inputs: its CUDA path against its reconstruct + torch
matmul path (fp32 accumulation) against x @ W in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import exllamav2_gpu as exl_bench  # sets EXLLAMA_NO_SDPA=1, the arch list, the repo path)
import torch

SEVEN_B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000}
DRY = {"hidden": 256, "intermediate": 768, "layers": 2, "heads": 4, "kv_heads": 4, "vocab": 512}
PROMPT_LENS = (16, 100, 256)
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def build_model(dims: dict, device: str, seed: int = 0, zero0: float = 0.01, std: float = 0.02):
    """A Llama QuantizedModel of ``dims``; every tensor drawn and packed on ``device``, one at a time."""
    from transformers import LlamaConfig

    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.packed import PackedLinear
    from awqconv.quant.grid import IntGrid

    h, inter, heads, kv = dims["hidden"], dims["intermediate"], dims["heads"], dims["kv_heads"]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=dims["layers"],
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=dims["vocab"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    hf = json.loads(json.dumps(cfg.to_dict()))
    hf["architectures"] = ["LlamaForCausalLM"]
    kvd = kv * (h // heads)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kvd, h), "self_attn.v_proj": (kvd, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    grid = IntGrid(bits=4, group_size=128)
    linears, dense = {}, {}
    for i in range(dims["layers"]):
        for suffix, (n, k) in shapes.items():
            p = grid.pack(randn(n, k) * std)
            z = p.zeros.clone()
            z[torch.rand(z.shape, generator=gen, device=device) < zero0] = 0  # AWQ makes these; RTN rarely
            linears[f"model.layers.{i}.{suffix}"] = PackedLinear.from_ints(p.unpack(), z, p.scales, p.group_size)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            dense[f"model.layers.{i}.{norm}.weight"] = (1 + 0.1 * randn(h)).half()
    dense["model.embed_tokens.weight"] = (randn(dims["vocab"], h) * std).half()
    dense["model.norm.weight"] = (1 + 0.1 * randn(h)).half()
    dense["lm_head.weight"] = (randn(dims["vocab"], h) * std).half()
    return QuantizedModel(hf, QuantConfig(group_size=128, method="rtn"), linears, dense)


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> dict:
    """max |dlogit|, logit scale, top-1 agreement over every position of every prompt."""
    rows = []
    for a, b in zip(ours, theirs):
        d = (a - b).abs()
        ta, tb = a.argmax(-1), b.argmax(-1)
        bad = (ta != tb).nonzero().flatten()
        # on disagreeing positions: how far apart our runtime puts the two candidates (near-ties?)
        gaps = (a[bad, ta[bad]] - a[bad, tb[bad]]).tolist() if len(bad) else []
        worst = d.amax(-1).topk(min(4, d.shape[0]))
        rows.append({"tokens": a.shape[0], "worst_positions": worst.indices.tolist(),
                     "worst_position_dlogit": [round(v, 4) for v in worst.values.tolist()], "max_abs_dlogit": d.max().item(), "mean_abs_dlogit": d.mean().item(),
                     "logit_absmax": a.abs().max().item(), "logit_std": a.std().item(),
                     "top1_agree": int((ta == tb).sum()), "top1_gap_where_disagree": [round(g, 4) for g in gaps]})
    n = sum(r["tokens"] for r in rows)
    return {"positions": n, "max_abs_dlogit": max(r["max_abs_dlogit"] for r in rows),
            "logit_absmax": max(r["logit_absmax"] for r in rows),
            "top1_agreement": sum(r["top1_agree"] for r in rows) / n, "per_prompt": rows}


def runtime_logits(qm, device: str, prompts: list[list[int]], dtype: torch.dtype | None = None,
                   mode: str = "auto") -> tuple[list[torch.Tensor], float]:
    from awqconv.runtime import RuntimeLM, build_decoder

    t = time.time()
    dec = build_decoder(qm, device, dtype=dtype, mode=mode)
    build_s = time.time() - t
    lm = RuntimeLM(dec)
    out = [lm(torch.tensor([p])).logits[0].float().cpu() for p in prompts]
    del lm, dec
    return out, build_s


def export(qm, out: Path) -> float:
    """awqconv.formats.exllamav2.write; the packing runs wherever the linears live (the GPU here)."""
    from awqconv.formats import exllamav2 as exl_format

    t = time.time()
    try:
        exl_format.write(qm, out, None)
    except Exception as e:  # noqa: BLE001  a device-side failure must not cost the run: retry from the CPU
        say(f"write from {next(iter(qm.linears.values())).qweight.device} failed ({e!r}); retrying on the CPU")
        shutil.rmtree(out)
        out.mkdir()
        qm.linears = {k: v.to("cpu") for k, v in qm.linears.items()}
        exl_format.write(qm, out, None)
    return time.time() - t


def start_exllamav2_build(log: Path) -> subprocess.Popen:
    """Install the wheel here, then JIT-build its extension in a child (shared torch_extensions cache)."""
    exl_bench.install_exllamav2()
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import exllamav2_gpu as b; "
            "b.install_exllamav2(); import exllamav2.ext")
    return subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def trace_exllamav2(qm, exl_model, prompt: list[int], worst: int, device: str = "cuda") -> dict:
    """Hidden states and per-linear errors of ExLlamaV2 against the fp32 HF reference (see --trace)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # the fp32 reference built in GPU memory (reference_model() would round-trip 27 GB through disk)
    cfg = LlamaConfig(**{k: v for k, v in qm.hf_config.items() if k != "quantization_config"})
    with torch.device(device):
        ref = LlamaForCausalLM(cfg).float().eval()
    ref.load_state_dict(qm.dequantized_state_dict(torch.float32), strict=True)
    ids = torch.tensor([prompt], device=device)
    lin_in, after_attn, after_mlp, hooks = {}, {}, {}, []
    for name, mod in ref.named_modules():
        if name.rsplit(".", 1)[-1] in _LINEARS:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: lin_in.__setitem__(name, a[0][0].detach().half())))
        if name.endswith("post_attention_layernorm"):
            i = int(name.split(".")[2])
            hooks.append(mod.register_forward_pre_hook(lambda m, a, i=i: after_attn.__setitem__(i, a[0][0].float())))
        if name.count(".") == 2 and name.startswith("model.layers."):
            i = int(name.split(".")[2])
            hooks.append(mod.register_forward_hook(lambda m, a, o, i=i: after_mlp.__setitem__(
                i, (o[0] if isinstance(o, tuple) else o)[0].float())))
    with torch.no_grad():
        ref(ids)
    for h in hooks:
        h.remove()
    del ref
    torch.cuda.empty_cache()

    n_mod = len(exl_model.modules)
    with torch.inference_mode():
        states = exl_model.forward_chunk(ids.cpu(), extract_state_indices=list(range(1, n_mod)))["states"]

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per position: max |a - b| / rms(b)
        return (a - b).abs().amax(-1) / b.pow(2).mean(-1).sqrt()

    layers = []
    for i in sorted(after_mlp):
        row = {"layer": i}
        for tag, ref_state, idx in (("attn", after_attn[i], 2 + 2 * i), ("mlp", after_mlp[i], 3 + 2 * i)):
            e = rel(states[idx][0].float(), ref_state)
            row[f"{tag}_worst_pos"] = round(e[worst].item(), 5)
            row[f"{tag}_median"] = round(e.median().item(), 5)
            row[f"{tag}_argmax_pos"] = int(e.argmax())
        row["ref_absmax_worst_pos"] = round(after_mlp[i][worst].abs().max().item(), 2)
        row["ref_absmax_median"] = round(after_mlp[i].abs().amax(-1).median().item(), 2)
        layers.append(row)

    exl_lin = {}
    for m in exl_model.modules:
        for attr in _LINEARS:
            sub = getattr(m, attr, None)
            if sub is not None:
                exl_lin[sub.key] = sub
    lins = []
    with torch.inference_mode():
        for name, x in lin_in.items():
            w = qm.linears[name].dequantize(torch.float32).to(device)
            y_ref = x.float() @ w.t()
            row = {"linear": name, "rows": x.shape[0]}
            for tag, kwargs in (("cuda", {}), ("recons_fp32acc", {"force_recons": True})):
                y = exl_lin[name].forward(x.unsqueeze(0), **kwargs)[0].float()
                e = rel(y, y_ref)
                row[f"{tag}_max"] = round(e.max().item(), 5)
                row[f"{tag}_median"] = round(e.median().item(), 5)
                row[f"{tag}_argmax_pos"] = int(e.argmax())
                row[f"{tag}_at_worst"] = round(e[worst].item(), 5)
            lins.append(row)
            del w, y_ref
    lins.sort(key=lambda r: -r["cuda_max"])
    return {"worst_position": worst, "layers": layers, "linears_top10": lins[:10],
            "linears_cuda_max": max(r["cuda_max"] for r in lins),
            "linears_recons_max": max(r["recons_fp32acc_max"] for r in lins),
            "linears_cuda_median_of_medians": sorted(r["cuda_median"] for r in lins)[len(lins) // 2],
            "linears_recons_median_of_medians": sorted(r["recons_fp32acc_median"] for r in lins)[len(lins) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, our runtime vs HF only")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32; dry run 2)")
    ap.add_argument("--no-fp32-ref", action="store_true", help="skip the fp32 dense reference (27 GB at 7B)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 32 = Llama-2-7B; 8 = GQA)")
    ap.add_argument("--trace", action="store_true", help="GPU: localise ExLlamaV2's departure (see module doc)")
    args = ap.parse_args()
    dims = dict(DRY if args.dry_run else SEVEN_B)
    for key, val in (("layers", args.layers), ("kv_heads", args.kv_heads)):
        if val is not None:
            dims[key] = val
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry-run)")
    out_root = Path(os.environ.get("OUT", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="exl7b_"))
    res: dict = {"dims": dims, "group_size": 128, "prompt_lens": list(PROMPT_LENS),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"}
    build = None if args.dry_run else start_exllamav2_build(work / "exllamav2_build.log")
    say(f"building {dims} on {device}")

    t = time.time()
    qm = build_model(dims, device)
    if device == "cuda":
        torch.cuda.synchronize()
    res["build_model_s"] = time.time() - t
    res["zero_point_0_groups"] = sum(int((p.zeros == 0).sum()) for p in qm.linears.values())
    res["groups"] = sum(p.zeros.numel() for p in qm.linears.values())
    say(f"built {len(qm.linears)} linears in {res['build_model_s']:.1f} s")

    exp = work / "exl"
    exp.mkdir()
    res["write_s"] = export(qm, exp)
    res["export_bytes"] = sum(f.stat().st_size for f in exp.glob("*.safetensors"))
    say(f"wrote {res['export_bytes'] / 2**30:.2f} GiB in {res['write_s']:.1f} s")

    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, dims["vocab"], (n,), generator=gen).tolist() for n in PROMPT_LENS]
    ours, res["runtime_build_s"] = runtime_logits(qm, device, prompts, torch.float16 if device == "cuda" else None)
    say("runtime logits done")
    ref32 = None
    if device == "cuda" and not args.no_fp32_ref:  # same canonical weights, dequantized, all fp32 (no TF32)
        ref32, _ = runtime_logits(qm, device, prompts, torch.float32, mode="dense")
        torch.cuda.empty_cache()
        res["runtime_fp16_vs_fp32_dense"] = compare(ours, ref32)
        say("fp32 dense reference done")

    if args.dry_run:
        from awqconv.formats import exllamav2 as exl_format
        from awqconv.reference import reference_model

        back = exl_format.read(exp)
        res["export_roundtrip_exact"] = all(back.linears[k].equal(p) for k, p in qm.linears.items())
        ref = reference_model(qm, torch.float32)
        with torch.no_grad():
            hf = [ref(torch.tensor([p])).logits[0].float() for p in prompts]
        res["runtime_vs_hf_fp32"] = compare(ours, hf)
        name = "exllamav2_7b_dry.json"
    else:
        if not args.trace:
            del qm
        torch.cuda.empty_cache()
        rc = build.wait()
        say(f"ExLlamaV2 build child exited {rc}")
        if rc:
            print((work / "exllamav2_build.log").read_text()[-3000:])
        import exllamav2
        from exllamav2 import ExLlamaV2, ExLlamaV2Config

        t = time.time()
        model = ExLlamaV2(ExLlamaV2Config(str(exp)))
        model.load()
        res["exllamav2_load_s"] = time.time() - t
        res["exllamav2"] = exllamav2.__version__
        say(f"ExLlamaV2 loaded in {res['exllamav2_load_s']:.1f} s")
        with torch.inference_mode():
            theirs = [model.forward(torch.tensor([p]))[0, :, :dims["vocab"]].float().cpu() for p in prompts]
        res["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["runtime_vs_exllamav2"] = compare(ours, theirs)
        if ref32 is not None:
            res["exllamav2_vs_fp32_dense"] = compare(theirs, ref32)
        if args.trace:
            last = res["runtime_vs_exllamav2"]["per_prompt"][-1]
            res["trace"] = trace_exllamav2(qm, model, prompts[-1], last["worst_positions"][0])
            print(json.dumps(res["trace"], indent=1), flush=True)
        model.unload()
        name = "exllamav2_7b_gpu.json"
    shutil.rmtree(work, ignore_errors=True)
    res["wall_s"] = time.time() - T0
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / name).write_text(json.dumps(res, indent=1))
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "per_prompt"} if isinstance(v, dict) else v)
               for k, v in res.items()}
    print(json.dumps(summary, indent=1))
    say(f"wrote {out_root / name}")


if __name__ == "__main__":
    main()
