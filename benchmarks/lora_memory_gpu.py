"""LoRA on the INT4 base vs on the PEFT FP layout: correctness, then memory and step time on a 7B shape (GPU).

1. Correctness (small Llama, bf16): the same LoRA (r=16, all-linear, same seed) trained 10 steps on
   awqconv.runtime.lora's INT4 model and on the PEFT-layout checkpoint loaded by plain transformers:
   initial logits and the loss curves must agree within bf16 noise.
2. Llama-2-7B shape (32 layers, hidden 4096, inter 11008, vocab 32000), random weights, bf16, g=128:
   base weight memory, peak memory and median step time of LoRA training (batch 1; seq 512 plain and
   seq 2048 with gradient checkpointing), INT4 base vs bf16 base.
Results: $OUT/lora_memory_gpu.json. Run from the repo root (peft/accelerate/psutil wheels in .whl/ are
installed offline when missing):  python benchmarks/lora_memory_gpu.py
(``--dry-run`` runs the same code on CPU with a small shape, to check the script itself.)
"""

from __future__ import annotations

import gc
import glob
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))

import torch

DTYPE = torch.bfloat16
GB = 1024**3
DRY = "--dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"


def ensure_packages() -> None:
    """Install peft (+ accelerate, psutil) from the wheels in .whl/ when missing: the GPU host is offline."""
    for module, wheel in (("psutil", "psutil-*.whl"), ("accelerate", "accelerate-*.whl"), ("peft", "peft-*.whl")):
        try:
            importlib.import_module(module)
        except ImportError:
            found = sorted(glob.glob(str(ROOT / ".whl" / wheel)))
            if not found:
                sys.exit(f"{module} is missing and .whl/ has no {wheel}: `pip download peft accelerate psutil -d .whl`")
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", found[-1]], check=True)
            importlib.invalidate_caches()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def mem_allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def mem_peak(reset: bool = False) -> int:
    if DEV != "cuda":
        return 0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated()


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(tie_word_embeddings=False, max_position_embeddings=4096, **kw)


def random_qm(cfg, device: str = DEV):
    """A QuantizedModel with random weights, built layer by layer on the GPU (no full float model)."""
    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.quant.grid import IntGrid

    gen = torch.Generator(device=device).manual_seed(0)
    grid = IntGrid(group_size=128, scale_dtype=DTYPE)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    linears, dense = {}, {}
    for i in range(cfg.num_hidden_layers):
        for part, (n, k) in shapes.items():
            w = torch.randn(n, k, device=device, generator=gen) * 0.02
            linears[f"model.layers.{i}.{part}"] = grid.pack(w)
        dense[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=DTYPE, device=device)
        dense[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=DTYPE, device=device)
    dense["model.embed_tokens.weight"] = (torch.randn(cfg.vocab_size, h, device=device, generator=gen) * 0.02).to(DTYPE)
    dense["lm_head.weight"] = (torch.randn(cfg.vocab_size, h, device=device, generator=gen) * 0.02).to(DTYPE)
    dense["model.norm.weight"] = torch.ones(h, dtype=DTYPE, device=device)
    hf = cfg.to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    return QuantizedModel(hf, QuantConfig(group_size=128, method="rtn", scale_dtype="bfloat16"), linears, dense)


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))


def train_steps(pm, ids, steps: int, checkpointing: bool = False) -> tuple[list[float], list[float]]:
    if checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    losses, times = [], []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    return losses, times


def correctness(results: dict) -> bool:
    from transformers import AutoModelForCausalLM

    from awqconv.formats import peft as peft_format
    from awqconv.runtime.lora import int4_model_for_training

    cfg = llama_config(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=1024)
    qm = random_qm(cfg)
    qm_cpu = type(qm)(qm.hf_config, qm.quant_config, {n: p.to("cpu") for n, p in qm.linears.items()},
                      {k: v.cpu() for k, v in qm.dense.items()})
    d = Path(tempfile.mkdtemp()) / "peft"
    d.mkdir()
    peft_format.write(qm_cpu, d, None)
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(1)).to(DEV)

    fp = AutoModelForCausalLM.from_pretrained(d, dtype=DTYPE).to(DEV)
    q = int4_model_for_training(qm, dtype=DTYPE, device=DEV)
    with torch.no_grad():
        a, b = fp(ids).logits.float(), q(ids).logits.float()
    logit_rel = ((a - b).norm() / a.norm()).item()
    fp_losses, _ = train_steps(lora(fp), ids, 10)
    q_losses, _ = train_steps(lora(q), ids, 10)
    worst = max(abs(x - y) / abs(x) for x, y in zip(fp_losses, q_losses))
    ok = logit_rel < 1e-2 and worst < 2e-2 and q_losses[-1] < q_losses[0]
    results["correctness"] = {"logits_rel_diff": logit_rel, "fp_losses": fp_losses, "int4_losses": q_losses,
                              "worst_loss_rel_diff": worst, "ok": ok}
    print(json.dumps(results["correctness"], indent=1))
    return ok


def measure(results: dict, label: str, build, seqs=((512, False), (2048, True))) -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    base0 = mem_allocated()
    t = time.time()
    model = build()
    build_s = time.time() - t
    base = mem_allocated() - base0
    pm = lora(model)
    row = {"base_weights_GiB": base / GB, "build_s": build_s,
           "lora_params_M": sum(p.numel() for p in pm.parameters() if p.requires_grad) / 1e6}
    for seq, ckpt in seqs:
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(2)).to(DEV)
        mem_peak(reset=True)
        _, times = train_steps(pm, ids, 6, checkpointing=ckpt)
        key = f"seq{seq}" + ("_ckpt" if ckpt else "")
        row[key] = {"peak_GiB": (mem_peak() - base0) / GB,
                    "step_ms_median": 1e3 * sorted(times[2:])[len(times[2:]) // 2]}
    results[label] = row
    print(label, json.dumps(row, indent=1))
    del pm, model
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    if not DRY and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or pass --dry-run)")
    ensure_packages()
    import peft
    import transformers

    from awqconv.runtime.lora import int4_model_for_training

    t0 = time.time()
    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__, "peft": peft.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ok = correctness(results)

    cfg7b = llama_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    seqs = ((512, False), (2048, True))
    if DRY:
        cfg7b = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=1000)
        seqs = ((32, False), (64, True))
    results["shape"] = "Llama-2-7B (random weights), bf16 activations, LoRA r=16 all-linear, AdamW, batch 1"

    def build_int4():
        qm = random_qm(cfg7b)
        model = int4_model_for_training(qm, dtype=DTYPE, device=DEV)
        del qm  # the model's buffers are the PackedLinears' repacked copies
        return model

    def build_bf16():
        from transformers import AutoModelForCausalLM

        with torch.device(DEV):
            return AutoModelForCausalLM.from_config(cfg7b, dtype=DTYPE)

    measure(results, "int4_base", build_int4, seqs)
    measure(results, "bf16_base", build_bf16, seqs)
    results["wall_s"] = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lora_memory_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT / 'lora_memory_gpu.json'} in {results['wall_s']:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
