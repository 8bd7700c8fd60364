"""Peak host memory and wall time of `awqconv quantize` on a model bigger than it should hold.

Writes a random Llama-2-7B-shaped bf16 checkpoint (32 layers, hidden 4096, MLP 11008, 6.9 B
parameters with SmolLM2's 49,152-token vocabulary and tokenizer, 13.5 GB) shard by shard, never more
than one layer in memory, then runs the CLI on it in a child process under ``/usr/bin/time -v`` and
reports the child's peak RSS, wall time and the per-layer time.

    python benchmarks/big_model_memory.py --dir /tmp/llama7b [--layers 32] [--method rtn]
        [--to canonical,hf-awq] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 << 30


def llama7b_config(layers: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def write_checkpoint(out: Path, layers: int) -> None:
    """Random bf16 weights (std 0.02), shards of ~2 GiB with an index, SmolLM2's tokenizer files."""
    from safetensors.torch import save_file

    from awqconv.sources import collect_assets, materialize_builtin

    tok = materialize_builtin()
    cfg = llama7b_config(layers, json.loads((tok / "config.json").read_text())["vocab_size"])
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out.mkdir(parents=True, exist_ok=True)

    def tensors():
        yield "model.embed_tokens.weight", (v, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield p + f"self_attn.{n}.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (f, h)
            yield p + "mlp.up_proj.weight", (f, h)
            yield p + "mlp.down_proj.weight", (h, f)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (v, h)

    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, names, weight_map = 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            names.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in tensors():
        t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else (
            torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    n = len(names)
    for i, old in enumerate(names):  # the hub's naming: model-0000k-of-0000n
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(out / old, out / new)
        weight_map = {k: (new if f == old else f) for k, f in weight_map.items()}
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for k, data in collect_assets(tok).items():
        if k not in ("config.json", "generation_config.json"):
            (out / k).write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or is written)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--to", default="canonical,hf-awq")
    ap.add_argument("--extra", default="", help="more quantize options, one string")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    a = ap.parse_args()
    model = a.dir / "model"
    if not (model / "model.safetensors.index.json").exists():
        t0 = time.time()
        write_checkpoint(model, a.layers)
        print(f"wrote {model} in {time.time() - t0:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    out = a.dir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "awqconv.cli", "quantize", str(model), "--method", a.method,
           "-g", "128", "--to", a.to, "-o", str(out), "-q", *a.extra.split()]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        sys.exit(f"quantize failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "model_GB": round(size / 1e9, 2),
           "layers": a.layers, "method": a.method, "to": a.to, "extra": a.extra, "wall_s": round(wall, 1),
           "peak_rss_GB": round(rss_kb * 1024 / 1e9, 2), "rss_over_model": round(rss_kb * 1024 / size, 2),
           "outputs_GB": round(out_bytes / 1e9, 2), "cli": r.stdout.strip().splitlines()[:1]}
    print(json.dumps(res, indent=1))
    results = ROOT / "benchmarks" / "results" / "big_model_memory.json"
    results.write_text(json.dumps(res, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
