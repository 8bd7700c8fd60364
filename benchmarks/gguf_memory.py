"""Peak memory of GGUF writing: tensors are produced and written one at a time.

    python benchmarks/gguf_memory.py smollm2 [--variants q4_1-awq,q4_0,f32] [--out /tmp/gguf_mem]
    python benchmarks/gguf_memory.py 7b      [--variants q4_1-awq]          [--out /tmp/gguf_mem]

``smollm2``: SmolLM2-135M, RTN g64 (QuantizedModel fully in memory). ``7b``: a Llama-2-7B-shaped
random model (hidden 4096, 32 layers, ffn 11008, 32 heads; the SmolLM2 tokenizer, so vocab 49152)
whose tensors are generated on access by lazy mappings, so no full set of weights ever exists: the
write's own peak is what is measured. RSS is sampled every 10 ms from /proc/self/statm; the report
gives the RSS before writing, the peak during it, the file size and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    def __enter__(self):
        self.start, self.peak, self._stop = rss(), rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())


class LazyTensors(Mapping):
    """name -> tensor generated from a per-name seed on every access (nothing is kept)."""

    def __init__(self, specs: dict, make):
        self.specs, self.make = specs, make

    def __getitem__(self, k):
        return self.make(k, self.specs[k])

    def __iter__(self):
        return iter(self.specs)

    def __len__(self):
        return len(self.specs)


def seven_b_model():
    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.packed import PackedLinear
    from awqconv.sources import collect_assets, resolve_model

    h, ff, layers, heads, vocab, g = 4096, 11008, 32, 32, 49152, 128
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h),
              "mlp.down_proj": (h, ff)}
    lin_specs = {f"model.layers.{i}.{n}": s for i in range(layers) for n, s in shapes.items()}
    dense_specs = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        dense_specs[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        dense_specs[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)

    def make_linear(name, shape):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out, n_in = shape
        qweight = torch.randint(0, 256, (out, n_in // 2), generator=gen, dtype=torch.uint8)
        zeros = torch.randint(0, 16, (out, n_in // g), generator=gen, dtype=torch.uint8)
        scales = (torch.rand(out, n_in // g, generator=gen) * 0.01 + 1e-3).half()
        return PackedLinear(qweight, scales, zeros, n_in, g, 4)

    def make_dense(name, shape):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(*shape, generator=gen) * 0.02).half() if len(shape) == 2 else torch.ones(shape).half()

    assets = collect_assets(resolve_model("builtin:smollm2-135m"))
    return QuantizedModel(cfg, QuantConfig(group_size=g), LazyTensors(lin_specs, make_linear),
                          LazyTensors(dense_specs, make_dense), provenance={"model_name": "random-7b-shaped"},
                          assets=assets)


def smollm2_model():
    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.quant.pipeline import quantize_model
    from awqconv.sources import (
        collect_assets,
        load_causal_lm,
        load_hf_config,
        resolve_model,
    )

    d = resolve_model("builtin:smollm2-135m")
    model, _ = load_causal_lm(d)
    cfg = QuantConfig(method="rtn", group_size=64)
    hf = load_hf_config(d)
    out = quantize_model(model, hf, cfg, None, progress=False)
    del model
    return QuantizedModel(hf, cfg, out.linears, out.dense, out.search, {"model_name": "SmolLM2-135M-Instruct"},
                          collect_assets(d), out.prescaled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["smollm2", "7b"])
    ap.add_argument("--variants", default=None)
    ap.add_argument("--out", default="/tmp/gguf_mem")
    args = ap.parse_args()
    from awqconv.formats import gguf

    variants = (args.variants or ("q4_1-awq,q4_0,f32" if args.model == "smollm2" else "q4_1-awq")).split(",")
    qm = smollm2_model() if args.model == "smollm2" else seven_b_model()
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        t = time.time()
        with PeakRSS() as m:
            r = gguf.write(qm, out, v)
        rows.append({"model": args.model, "variant": v, "seconds": round(time.time() - t, 1),
                     "rss_before_MiB": round(m.start / 2**20), "rss_peak_MiB": round(m.peak / 2**20),
                     "peak_minus_before_MiB": round((m.peak - m.start) / 2**20),
                     "file_MiB": round(r.path.stat().st_size / 2**20), "tensor_types": r.tensor_types})
        print(json.dumps(rows[-1]), flush=True)
        if args.model == "7b":
            r.path.unlink()
    (Path(args.out) / f"gguf_memory_{args.model}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
