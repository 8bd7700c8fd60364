"""llama.cpp perplexity of K-quant GGUFs with and without an importance matrix (imatrix).

    python benchmarks/gguf_imatrix_ppl.py [--model builtin:smollm2-135m] [--variant q4_k_m] [--group-size 64]
        [--calib-samples 128] [--windows 0] [--llama-bin DIR] [--tool-chunks N] [--out /tmp/gguf_imatrix_ppl]

Rows, all scored by llama.cpp (llama-cpp-python) on awqconv/data/eval_heldout.txt with gguf_ppl.py's
protocol (non-overlapping 512-token windows, tokens 2..512 scored); calibration on awqconv's builtin
corpus (awqconv/data/calib_builtin.txt), which shares no text with the held-out file:
  f16               the float model as an F16 GGUF (reference)
  plain             K-quant of the float weights: no AWQ prescale, no imatrix
  awq               K-quant of the AWQ-prescaled weights, no imatrix
  awq_imatrix       the same with awqconv's imatrix (collected by the quantizer, divided by the AWQ scales)
  llama_imatrix     plain weights + llama.cpp's own recipe: llama-imatrix on the F16 GGUF, then
                    llama-quantize --imatrix (needs --llama-bin; skipped without it)
  awq_llama_imatrix AWQ-prescaled weights + llama-imatrix run on their F16 GGUF: a cross-check of
                    awqconv's statistics (also reports how close the two imatrices are)
Token embeddings / output are Q8_0 in every row (awqconv's K-quant setting, passed to llama-quantize
too). Results go to <out>/gguf_imatrix_ppl.json as they come and to
benchmarks/results/gguf_imatrix_ppl.json at the end; files already in <out> are reused, so an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gguf_ppl import llama_cpp_ppl, quantized  # noqa: E402  (the shared helpers of the GGUF benchmarks)

TOOL_TYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q6_k": "Q6_K",
              "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_imatrix(bin_dir: Path, f16: Path, calib_txt: Path, out: Path, chunks: int, ctx: int, threads: int) -> float:
    """llama.cpp's imatrix tool over the calibration text; returns its wall seconds."""
    t = time.time()
    cmd = [str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(calib_txt), "-o", str(out), "-c", str(ctx),
           "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-ppl", "--output-format", "gguf"]
    subprocess.run(cmd, check=True, capture_output=True)
    return round(time.time() - t, 1)


def llama_quantize_tool(bin_dir: Path, f16: Path, imatrix: Path, out: Path, variant: str, threads: int) -> None:
    cmd = [str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), "--token-embedding-type", "q8_0",
           "--output-tensor-type", "q8_0", str(f16), str(out), TOOL_TYPES[variant], str(threads)]
    subprocess.run(cmd, check=True, capture_output=True)


def imatrix_agreement(ours: Path, theirs: Path) -> dict:
    """How close two imatrices are: per weight, the relative L2 distance of ``E[x^2]`` (each
    normalised to mean 1, since llama.cpp's scale is irrelevant to the weighting)."""
    from awqconv.formats.gguf_imatrix import read_imatrix

    a, _ = read_imatrix(ours)
    b, _ = read_imatrix(theirs)
    dists = []
    for name in sorted(set(a) & set(b)):
        x, y = a[name].weights(), b[name].weights()
        x, y = x / x.mean(), y / y.mean()
        dists.append(float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    return {"weights_compared": len(dists), "only_ours": len(set(a) - set(b)), "only_llama": len(set(b) - set(a)),
            "rel_l2_median": float(np.median(dists)), "rel_l2_max": float(np.max(dists))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--variant", default="q4_k_m", choices=sorted(TOOL_TYPES))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=0, help="512-token evaluation windows (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path, default=None,
                    help="directory holding llama-imatrix and llama-quantize built from llama-cpp-python's vendor/llama.cpp")
    ap.add_argument("--tool-chunks", type=int, default=0,
                    help="512-token chunks llama-imatrix reads (0 = --calib-samples, the tokens awqconv calibrates on)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf_imatrix_ppl"))
    ap.add_argument("--note", default="", help="free text saved with the results (e.g. how the tools were built)")
    args = ap.parse_args()

    import torch

    from awqconv.config import QuantConfig
    from awqconv.formats import gguf
    from awqconv.quant.calib import build_blocks, load_calibration_texts
    from awqconv.sources import load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    store = out / "gguf_imatrix_ppl.json"
    res: dict = json.loads(store.read_text()) if store.exists() else {}
    v = args.variant

    def save(key: str, value) -> None:
        res[key] = value
        store.write_text(json.dumps(res, indent=2))
        print(f"{key}: {value}", flush=True)

    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    text = (ROOT / "awqconv" / "data" / "eval_heldout.txt").read_text()
    ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.numel() // 512 if args.windows == 0 else min(args.windows, ids.numel() // 512)
    windows = ids[: n * 512].reshape(n, 512)
    res.update({"model": args.model, "variant": v, "group_size": args.group_size, "calib_samples": args.calib_samples,
                "windows": n, "tokens_scored": n * 511, "date": str(date.today()),
                "machine": f"{_cpu()}, {args.threads} threads, llama-cpp-python "
                           f"{__import__('llama_cpp').__version__}, torch {torch.__version__}",
                "command": " ".join([Path(sys.executable).name, *sys.argv]), "note": args.note})

    base = QuantConfig(group_size=args.group_size, calib_samples=args.calib_samples)
    texts = load_calibration_texts(base.calib, split=base.calib_split, text_column=base.calib_text_column, n_samples=None)
    name = model_dir.name
    d = {k: out / k for k in ("plain", "awq", "awq_imatrix", "llama_imatrix", "awq_llama_imatrix")}
    f = {k: p / f"{name}-{v}.gguf" for k, p in d.items()}
    f16_plain, f16_awq = d["plain"] / f"{name}-f16.gguf", d["awq"] / f"{name}-f16.gguf"

    if not (f["plain"].exists() and f16_plain.exists()):
        rtn, _ = quantized(model_dir, base.with_overrides(method="rtn"), None)  # RTN: prescaled == float weights
        for variant in (v, "f16"):
            d["plain"].mkdir(exist_ok=True)
            gguf.write(rtn, d["plain"], variant)
        del rtn
    if not (f["awq"].exists() and f["awq_imatrix"].exists() and f16_awq.exists()):
        blocks = build_blocks(texts, tok, base.calib_samples, base.calib_seq_len)[0]
        awq, secs = quantized(model_dir, base, blocks)
        save("seconds_awq", secs)
        d["awq_imatrix"].mkdir(exist_ok=True)
        r = gguf.write(awq, d["awq_imatrix"], v)  # with awqconv's imatrix, saved beside it
        save("awqconv_imatrix_file", str(r.imatrix))
        awq.importance = None
        d["awq"].mkdir(exist_ok=True)
        gguf.write(awq, d["awq"], v)
        gguf.write(awq, d["awq"], "f16")
        del awq

    for key, path in (("f16", f16_plain), ("plain", f["plain"]), ("awq", f["awq"]), ("awq_imatrix", f["awq_imatrix"])):
        if f"ppl_{key}" not in res:
            save(f"ppl_{key}", llama_cpp_ppl(path, windows, args.threads))

    if args.llama_bin is None or not (args.llama_bin / "llama-imatrix").exists():
        save("llama_imatrix_rows", f"skipped: no llama-imatrix in {args.llama_bin} (build it from llama-cpp-python's "
                                   "sdist vendor/llama.cpp: cmake -DLLAMA_CURL=OFF; ninja llama-imatrix llama-quantize)")
    else:
        calib_txt = out / "calib_builtin.txt"  # the documents awqconv calibrates on, in the same order
        calib_txt.write_text("\n\n".join(t.strip() for t in texts if t.strip()))
        for key, f16 in (("llama_imatrix", f16_plain), ("awq_llama_imatrix", f16_awq)):
            imx = d[key] / "llama.imatrix"
            d[key].mkdir(exist_ok=True)
            if not imx.exists():
                chunks = args.tool_chunks or base.calib_samples
                save("llama_imatrix_chunks", chunks)
                save(f"seconds_{key}_tool", llama_imatrix(args.llama_bin, f16, calib_txt, imx, chunks,
                                                          base.calib_seq_len, args.threads))
            if not f[key].exists():
                llama_quantize_tool(args.llama_bin, f16, imx, f[key], v, args.threads)
            if f"ppl_{key}" not in res:
                save(f"ppl_{key}", llama_cpp_ppl(f[key], windows, args.threads))
        if "imatrix_agreement" not in res:
            ours = d["awq_imatrix"] / f"{name}.imatrix"
            save("imatrix_agreement", imatrix_agreement(ours, d["awq_llama_imatrix"] / "llama.imatrix"))

    dest = ROOT / "benchmarks" / "results" / "gguf_imatrix_ppl.json"
    dest.write_text(json.dumps(res, indent=2) + "\n")
    rows = [("F16 (reference)", "f16"), (f"{v} plain", "plain"), (f"{v} AWQ-prescaled", "awq"),
            (f"{v} AWQ-prescaled + awqconv imatrix", "awq_imatrix"), (f"{v} plain + llama-imatrix", "llama_imatrix"),
            (f"{v} AWQ-prescaled + llama-imatrix", "awq_llama_imatrix")]
    print("\n| GGUF | perplexity |\n|---|---|")
    for label, key in rows:
        print(f"| {label} | {res[f'ppl_{key}']:.3f} |" if f"ppl_{key}" in res else f"| {label} | not run |")
    print(f"{n} windows x 512 tokens of eval_heldout.txt; wrote {dest}")


if __name__ == "__main__":
    main()
