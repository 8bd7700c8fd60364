"""Quality and speed of the quantizer on SmolLM2-135M, plus AWQ vs RTN on every tiny architecture.

Runs the real CLI in subprocesses (so wall time and peak RSS are those of one `awqconv quantize`),
then measures perplexity on the held-out text (awqconv/data/eval_heldout.txt, disjoint from the
builtin calibration corpus) with awqconv's evaluator on each artifact's fake-quant reference.

    python benchmarks/quality_smollm2.py [--group-size 64] [--eval-windows 45] [--skip-tiny]

Writes benchmarks/results/quality_smollm2.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quantize(out: Path, *args: str) -> dict:
    cmd = ["awqconv", "quantize", "builtin:smollm2-135m", "-o", str(out), "--overwrite", "-q", "--to", "canonical", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
    return {"command": " ".join(cmd), "seconds": round(wall, 1), "peak_rss_mib": round(max(peak, before) / 1024)}


def tiny_comparison(group: int) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.quant.calib import build_blocks, load_calibration_texts
    from awqconv.quant.mappings import ARCHITECTURES
    from awqconv.quant.pipeline import quantize_model
    from awqconv.sources import load_hf_config
    from tests.tiny_models import tiny_model_dir

    heldout = (ROOT / "awqconv" / "data" / "eval_heldout.txt").read_text(encoding="utf-8")
    rows = []
    for arch in sorted(ARCHITECTURES):
        path = tiny_model_dir(arch)
        hf = load_hf_config(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = build_blocks([heldout[:200000]], tok, 8, 256).ids
        calib = build_blocks(load_calibration_texts("builtin"), tok, 32, 256).ids
        load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
        with torch.no_grad():
            ref = torch.log_softmax(load()(ids).logits.float(), -1)
        res = {"arch": arch}
        for method in ("rtn", "awq"):
            cfg = QuantConfig(method=method, group_size=group, calib_samples=32, calib_seq_len=256)
            out = quantize_model(load(), hf, cfg, calib if method == "awq" else None, progress=False)
            qm = QuantizedModel(hf, cfg, out.linears, out.dense, out.search)
            m = load()
            m.load_state_dict(qm.dequantized_state_dict(), strict=False)
            with torch.no_grad():
                lp = torch.log_softmax(m(ids).logits.float(), -1)
            res[f"{method}_kl"] = float((ref.exp() * (ref - lp)).sum(-1).mean())  # KL(float || quantized)
        rows.append(res)
        print(f"  {arch:<22} KL rtn {res['rtn_kl']:.5f}  awq {res['awq_kl']:.5f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=45)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="extra `awqconv quantize` options for the AWQ run")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from awqconv.api import evaluate
    from awqconv.sources import resolve_model

    text = (ROOT / "awqconv" / "data" / "eval_heldout.txt").read_text(encoding="utf-8")
    g = str(args.group_size)
    result: dict = {"date": str(date.today()), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                    "group_size": args.group_size, "eval_windows": args.eval_windows, "seq_len": args.seq_len}
    ev = lambda p: evaluate(p, text, seq_len=args.seq_len, max_windows=args.eval_windows)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        result["float_ppl"] = ev(resolve_model("builtin:smollm2-135m"))
        print(f"float  ppl {result['float_ppl']:.4f}", flush=True)
        rtn = quantize(Path(tmp) / "rtn", "--method", "rtn", "-g", g)
        result["rtn"] = {**rtn, "ppl": ev(Path(tmp) / "rtn" / "canonical")}
        print(f"rtn    ppl {result['rtn']['ppl']:.4f}  ({rtn['seconds']} s)", flush=True)
        awq = quantize(Path(tmp) / "awq", "-g", g, *args.extra)
        result["awq"] = {**awq, "ppl": ev(Path(tmp) / "awq" / "canonical")}
        print(f"awq    ppl {result['awq']['ppl']:.4f}  ({awq['seconds']} s, peak {awq['peak_rss_mib']} MiB)", flush=True)
    gap = result["rtn"]["ppl"] - result["float_ppl"]
    result["gap_closed"] = (result["rtn"]["ppl"] - result["awq"]["ppl"]) / gap if gap > 0 else float("nan")
    if not args.skip_tiny:
        result["tiny"] = tiny_comparison(32)
    out = ROOT / "benchmarks" / "results" / f"quality_smollm2_g{args.group_size}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| model | perplexity |\n|---|---|\n| float | {result['float_ppl']:.3f} |\n"
          f"| RTN g{g} | {result['rtn']['ppl']:.3f} |\n| AWQ g{g} | {result['awq']['ppl']:.3f} |\n"
          f"AWQ closes {result['gap_closed']:.1%} of the RTN->float gap; AWQ quantize {result['awq']['seconds']} s, "
          f"peak RSS {result['awq']['peak_rss_mib']} MiB. Wrote {out}")


if __name__ == "__main__":
    main()
