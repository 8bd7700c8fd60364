"""ExLlamaV2 loads awqconv's exllamav2 export: correctness first, then per-linear kernel timings (GPU).

1. A random Llama (4 layers, hidden 1024, GQA), RTN-quantized (g=128) with ~3 % of (row, group) zero
   points forced to 0, is written by awqconv.formats.exllamav2 and loaded by ExLlamaV2 0.3.2. Checks:
   every linear's ExLlamaV2 reconstruct equals fl16((q - z) * s) exactly (zero-0 groups included),
   and ExLlamaV2 logits match HF transformers (fp16, same on-grid weights, eager attention).
2. Times on Llama-2-7B linear shapes, M in {1, 16, 64, 512}: fp16 cuBLAS, ExLlamaV2 gemm_half_q_half
   on our tensors, awqconv's Triton w4_matmul. Median of triton.testing.do_bench.
Results: $OUT/exllamav2_gpu.json. Run from the repo root (wheels in .whl/, installed offline):
    python benchmarks/exllamav2_gpu.py            # ~3 min of it is ExLlamaV2's one-time JIT build
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", tempfile.gettempdir()))
os.environ.setdefault("EXLLAMA_NO_SDPA", "1")  # 0.3.2's SDPA path drops the causal mask
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))

import torch


def install_exllamav2() -> None:
    """Install the JIT wheel (+ ninja) from .whl/ with no network; stub imports only the VLM/UI use."""
    try:
        import exllamav2  # noqa: F401
        return
    except ImportError:
        pass
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "exllamav2-*.whl"))) + sorted(glob.glob(str(ROOT / ".whl" / "ninja-*.whl")))
    if not wheels:
        sys.exit("no exllamav2 wheel in .whl/: run `pip download exllamav2==0.3.2 ninja --no-deps -d .whl` first")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *wheels], check=True)
    ninja_bin = Path(sys.executable).parent
    os.environ["PATH"] = f"{ninja_bin}:{os.environ.get('PATH', '')}"
    # exllamav2 imports rich (progress bars) and PIL (vision towers) at import time; neither is used here
    for mod, attrs in (("rich", ()), ("rich.progress", ("Progress", "BarColumn", "TextColumn",
                                                       "TimeElapsedColumn", "TimeRemainingColumn")),
                       ("PIL", ()), ("PIL.Image", ("Image",))):
        try:
            __import__(mod)
        except ImportError:
            m = types.ModuleType(mod)
            for a in attrs:
                setattr(m, a, type(a, (), {}))
            sys.modules[mod] = m
            if "." in mod:
                parent, _, child = mod.rpartition(".")
                setattr(sys.modules[parent], child, m)


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.packed import PackedLinear
    from awqconv.quant.grid import IntGrid

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048,
                      rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    grid = IntGrid(group_size=128)
    gen = torch.Generator().manual_seed(1)
    linears = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            p = grid.pack(mod.weight)
            z = p.zeros.clone()
            z[torch.rand(z.shape, generator=gen) < 0.03] = 0  # AWQ produces these; Gaussian RTN rarely does
            linears[name] = PackedLinear.from_ints(p.unpack(), z, p.scales, p.group_size)
    keys = {f"{n}.weight" for n in linears}
    dense = {k: v.detach().half() for k, v in model.state_dict().items() if k not in keys}
    hf = cfg.to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    qm = QuantizedModel(hf, QuantConfig(group_size=128, method="rtn"), linears, dense)
    # the HF reference holds exactly the canonical weights, in fp16
    model.load_state_dict(qm.dequantized_state_dict(torch.float16), strict=True)
    return qm, model.half()


def correctness(results: dict) -> None:
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.linear import ExLlamaV2Linear

    from awqconv.formats import exllamav2 as exl_format

    qm, hf_model = tiny_model()
    n_zero = sum(int((p.zeros == 0).sum()) for p in qm.linears.values())
    out = Path(tempfile.mkdtemp()) / "exl"
    out.mkdir()
    exl_format.write(qm, out, None)
    t0 = time.time()
    config = ExLlamaV2Config(str(out))
    model = ExLlamaV2(config)
    model.load()
    load_s = time.time() - t0

    exact, checked = 0, 0
    stack = list(model.modules)
    while stack:
        m = stack.pop()
        stack.extend(getattr(m, "submodules", []))
        if isinstance(m, ExLlamaV2Linear) and m.key in qm.linears:
            checked += 1
            w = m.get_weight_tensor_dq()  # [in, out] fp16, ExLlamaV2's own reconstruct kernel
            want = qm.linears[m.key].dequantize(torch.float16).t().to(w.device)
            # value equality: flipped groups give -0.0 where q == z, the same weight as +0.0
            same = torch.equal(w, want)
            exact += same
            if not same:
                bad = (w != want).nonzero()
                print(f"MISMATCH {m.key}: {len(bad)} elements, first {bad[:3].tolist()}")
    ids = torch.randint(0, 4096, (1, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exl_logits = model.forward(ids).float().cpu()
        hf_model = hf_model.cuda()
        hf_logits = hf_model(ids.cuda()).logits.float().cpu()
    diff = (exl_logits - hf_logits).abs().max().item()
    agree = (exl_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()
    results["correctness"] = {
        "linears_checked": checked, "linears_bit_exact": exact, "zero_point_0_groups": n_zero,
        "logits_max_abs_diff_vs_hf_fp16": diff, "logits_max_abs": hf_logits.abs().max().item(),
        "argmax_agreement": agree, "load_s": load_s,
    }
    print(json.dumps(results["correctness"], indent=1))
    ok = checked == len(qm.linears) and exact == checked and diff < 0.05 and agree > 0.99
    results["correctness"]["ok"] = ok
    if not ok:
        print("CORRECTNESS FAILED")
    model.unload()


def timings(results: dict) -> None:
    import torch.nn.functional as F
    import triton
    from exllamav2.ext import exllamav2_ext as ext_c
    from exllamav2.ext import make_q_matrix

    from awqconv.formats.gptq_layout import to_gptq
    from awqconv.kernels.layout import KernelWeight
    from awqconv.kernels.ops import w4_matmul
    from awqconv.quant.grid import IntGrid

    rows = []
    grid = IntGrid(group_size=128)
    for label, k, n in (("o_proj", 4096, 4096), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096)):
        w = torch.randn(n, k, device="cuda") * 0.02
        p = grid.pack(w)
        w16 = p.dequantize(torch.float16)  # [N, K]
        t = to_gptq(p)
        tensors = {"qweight": t.qweight.cuda(), "qzeros": t.qzeros.cuda(), "scales": t.scales.half().cuda()}
        temp_dq = torch.empty(k * n + 64, dtype=torch.half, device="cuda")
        handle = make_q_matrix(tensors, temp_dq, max_dq_rows=k)
        kw = KernelWeight.from_packed(p).to("cuda")
        for m in (1, 16, 64, 512):
            x = torch.randn(m, k, device="cuda", dtype=torch.half)
            y_exl = torch.empty(m, n, device="cuda", dtype=torch.half)
            ref = F.linear(x.float(), w16.float())

            def exl(x=x, handle=handle, y_exl=y_exl):
                ext_c.gemm_half_q_half(x, handle, y_exl, False)

            def err(y, ref=ref):
                return ((y.float() - ref).norm() / ref.norm()).item()

            exl()
            y_ours = w4_matmul(x, kw)
            row = {"shape": label, "K": k, "N": n, "M": m,
                   "fp16_us": 1e3 * triton.testing.do_bench(lambda x=x, w16=w16: F.linear(x, w16), return_mode="median"),
                   "exllamav2_us": 1e3 * triton.testing.do_bench(exl, return_mode="median"),
                   "awqconv_us": 1e3 * triton.testing.do_bench(lambda x=x, kw=kw: w4_matmul(x, kw), return_mode="median"),
                   "exllamav2_rel_err": err(y_exl), "awqconv_rel_err": err(y_ours)}
            rows.append(row)
            print(f"{label:9s} M={m:4d}  fp16 {row['fp16_us']:7.1f} us  exllamav2 {row['exllamav2_us']:7.1f} us  "
                  f"awqconv {row['awqconv_us']:7.1f} us  (rel err {row['exllamav2_rel_err']:.1e} / {row['awqconv_rel_err']:.1e})")
    results["timings"] = rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.time()
    install_exllamav2()
    import exllamav2

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "exllamav2": exllamav2.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    correctness(results)
    timings(results)
    results["wall_s"] = time.time() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "exllamav2_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT / 'exllamav2_gpu.json'} in {results['wall_s']:.0f} s")
    if not results["correctness"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
