"""Batch-1 decode of full-size random INT4 models of the newer families against the same runtime on
fp16 weights: Qwen3-8B-shaped (q/k norms, GQA 32/8) and Qwen3-30B-A3B-shaped (128 experts, top-8,
grouped INT4 expert GEMVs). Mixtral-8x7B-shaped is available too (``--models mixtral-8x7b``); its
fp16 weights (93 GB) fit only an H200.

Parameter names and shapes come from transformers' own model class built on the meta device (so the
checkpoint is exactly what the quantizer would emit: experts unfused into per-expert linears, the
router dense). Every decoder linear gets random canonical integers (g128, fp16 scales ~ 1/(8 sqrt K),
zero points 7-8, which keep activations O(1)); norms are ones, the embedding and router random. The
quantized model stays on the host so that the INT4 decoder and then the fp16 one are built on the GPU
one at a time (Qwen3-30B-A3B in fp16 is 61 GB). Each path: the logits of a 32-token prefill compared,
then greedy decode of 64 + 256 and 1792 + 256 tokens (``gpu_decode.run_decode``: tok/s, peak memory).

    python benchmarks/gpu_decode_families.py [--models qwen3-8b qwen3-30b-a3b] [--layers N] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gpu_decode import run_decode  # noqa: E402  (benchmarks/ is the script's directory)

from awqconv.config import QuantConfig  # noqa: E402
from awqconv.model import QuantizedModel  # noqa: E402
from awqconv.packed import PackedLinear  # noqa: E402
from awqconv.runtime.model import build_decoder  # noqa: E402

G = 128
GEN = "cuda"  # where the random integers are drawn (the GPU: fast), before they move to the host
_COMMON = dict(num_attention_heads=32, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
               max_position_embeddings=40960)
MODELS = {
    "qwen3-8b": ("qwen3", "Qwen3ForCausalLM",
                 dict(_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_key_value_heads=8, vocab_size=151936)),
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeForCausalLM",
                      dict(_COMMON, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                           num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                           mlp_only_layers=[], num_hidden_layers=48, num_key_value_heads=4, vocab_size=151936)),
    "mixtral-8x7b": ("mixtral", "MixtralForCausalLM",
                     dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                          max_position_embeddings=32768)),
}


def checkpoint_shapes(model_type: str, arch: str, cfg: dict) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(the config dict, {parameter name: shape}) of transformers' class, experts unfused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(model_type, **cfg, architectures=[arch])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    shapes = {}
    for k, v in model.state_dict().items():
        stem = k.rsplit(".", 1)[0] + "."
        if k.endswith("experts.gate_up_proj"):  # [E, 2 I, H]: gate rows then up rows
            for e in range(v.shape[0]):
                shapes[f"{stem}{e}.gate_proj.weight"] = shapes[f"{stem}{e}.up_proj.weight"] = (v.shape[1] // 2,
                                                                                                v.shape[2])
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                shapes[f"{stem}{e}.down_proj.weight"] = tuple(v.shape[1:])
        else:
            shapes[k] = tuple(v.shape)
    hf = json.loads(json.dumps(conf.to_dict()))
    hf["architectures"] = [arch]
    return hf, shapes


def random_packed(out: int, k: int, dtype: torch.dtype) -> PackedLinear:
    """Random canonical integers made on the GPU (fast), kept on the host."""
    s = (torch.rand(out, k // G, device=GEN) * 0.5 + 0.75) / (8 * k ** 0.5)
    return PackedLinear(torch.randint(0, 256, (out, k // 2), dtype=torch.uint8, device=GEN).cpu(),
                        s.to(dtype).cpu(), torch.randint(7, 9, (out, k // G), dtype=torch.uint8, device=GEN).cpu(),
                        k, G)


def random_qm(name: str, layers: int | None, dtype: torch.dtype = torch.float16) -> QuantizedModel:
    model_type, arch, cfg = MODELS[name]
    cfg = dict(cfg, **({} if layers is None else {"num_hidden_layers": layers}))
    hf, shapes = checkpoint_shapes(model_type, arch, cfg)
    linears, dense = {}, {}
    for k, shp in shapes.items():
        if ".layers." in k and len(shp) == 2 and not k.endswith("mlp.gate.weight"):
            linears[k[:-len(".weight")]] = random_packed(shp[0], shp[1], dtype)
        elif len(shp) == 1:
            dense[k] = torch.ones(shp, dtype=dtype)
        else:  # embedding, lm_head, routers
            dense[k] = (torch.randn(shp, device=GEN) * (0.5 if "embed" in k else shp[1] ** -0.5)).to(dtype).cpu()
    return QuantizedModel(hf_config=hf, quant_config=QuantConfig(method="rtn"), linears=linears, dense=dense)


def prefill_logits(dec, ids: torch.Tensor) -> torch.Tensor:
    dec.allocate_cache(1, 64)
    with torch.no_grad():
        out = dec(ids, torch.arange(ids.shape[1], device="cuda")[None], torch.tensor(0, device="cuda"), ids.shape[1],
                  last_only=False).float()
    return out


def bench_model(name: str, layers: int | None) -> dict:
    t0 = time.time()
    qm = random_qm(name, layers)
    int4_bytes = sum(p.qweight.numel() + p.scales.numel() * 2 + p.zeros.numel() for p in qm.linears.values())
    res = {"model": name, "layers": qm.hf_config["num_hidden_layers"], "int4_linear_GB": round(int4_bytes / 1e9, 2),
           "made_s": round(time.time() - t0, 1), "runs": []}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    ids = torch.randint(0, 32000, (1, 32), device="cuda")
    logits = {}
    for label, mode in (("awqconv_int4", "auto"), ("awqconv_fp16_dense", "dense")):
        t0 = time.time()
        dec = build_decoder(qm, "cuda", mode=mode)
        torch.cuda.synchronize()
        res[f"{label}_weights_GB"] = round(torch.cuda.memory_allocated() / 1e9, 2)
        res[f"{label}_build_s"] = round(time.time() - t0, 1)
        logits[label] = prefill_logits(dec, ids)
        for prompt in (64, 1792):
            res["runs"].append(run_decode(dec, f"{name}_{label}", prompt, 256, 2048))
        del dec
        gc.collect()
        torch.cuda.empty_cache()
    a, b = logits["awqconv_int4"], logits["awqconv_fp16_dense"]
    res["check"] = {"finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
                    "max_rel_dlogit": ((a - b).abs().max() / b.abs().max()).item(),
                    "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    tok = {(r["label"], r["prompt"]): r["decode_tok_s"] for r in res["runs"]}
    res["speedup_int4_over_fp16"] = {p: round(tok[f"{name}_awqconv_int4", p] / tok[f"{name}_awqconv_fp16_dense", p], 2)
                                     for p in (64, 1792)}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["qwen3-8b", "qwen3-30b-a3b"], choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": []}
    for name in a.models:
        results["models"].append(bench_model(name, a.layers))
        with open(os.path.join(a.out, "gpu_decode_families.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
