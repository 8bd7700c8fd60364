"""llama.cpp perplexity of AWQ GGUF exports vs plain GGUF, and vs awqconv's own evaluator.

    python benchmarks/gguf_ppl.py [--model builtin:smollm2-135m] [--group-size 64] [--calib-samples 32]
                                  [--windows 40] [--rows a,b,b2,c,d,fp] [--out /tmp/gguf_ppl]

Rows (all on awqconv/data/eval_heldout.txt with the evaluator's protocol: one tokenization,
non-overlapping 512-token windows, tokens 2..512 of each window scored, no carried context):
  fp   the float model in awqconv's evaluator (reference)
  a    plain q4_0 GGUF of the float weights (RTN, no AWQ), llama.cpp
  b    AWQ-prescaled q4_0 GGUF, the search run on the Q4_0 block grid (GGUFGrid("q4_0")), llama.cpp
  b2   AWQ-prescaled q4_0 GGUF from the g<group> integer-grid search, llama.cpp
  c    gguf:q4_1-awq transplant of the g<group> AWQ model, llama.cpp
  d    the same AWQ g<group> model in awqconv's evaluator (read back from the transplant: exact)
Expected: b < a; |c - d| / d < 0.5 %. Each row is saved to <out>/gguf_ppl.json as soon as it is
known and GGUF files already in <out> are reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    """Same protocol as awqconv.evaluate.perplexity_of_ids, computed from llama.cpp's logits."""
    import llama_cpp

    seq = windows.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True,
                          verbose=False, n_threads=threads)
    total, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[: seq - 1], dtype=np.float32))
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").double())
        count += seq - 1
    llm.close()
    return math.exp(total / count)


def quantized(model_dir: Path, cfg, blocks, search_grid=None):
    from awqconv.model import QuantizedModel
    from awqconv.quant.pipeline import quantize_model
    from awqconv.sources import collect_assets, load_causal_lm, load_hf_config

    model, _ = load_causal_lm(model_dir)
    hf_config = load_hf_config(model_dir)
    t = time.time()
    out = quantize_model(model, hf_config, cfg, blocks, search_grid=search_grid, progress=True)
    secs = round(time.time() - t, 1)
    qm = QuantizedModel(hf_config, cfg, out.linears, out.dense, out.search,
                        {"model_name": model_dir.name}, collect_assets(model_dir), out.prescaled,
                        importance=out.importance)
    return qm, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=40, help="512-token evaluation windows (0 = all)")
    ap.add_argument("--rows", default="fp,a,c,d,b2,b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/gguf_ppl")
    args = ap.parse_args()

    from awqconv.config import QuantConfig
    from awqconv.evaluate import perplexity_of_ids
    from awqconv.formats import gguf
    from awqconv.quant.calib import build_blocks, load_calibration_texts
    from awqconv.quant.gguf_grid import GGUFGrid
    from awqconv.reference import reference_model
    from awqconv.sources import load_causal_lm, resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "gguf_ppl.json"
    res: dict = json.loads(store.read_text()) if store.exists() else {}
    rows = args.rows.split(",")

    def save(key: str, value) -> None:
        res[key] = value
        store.write_text(json.dumps(res, indent=2))
        print(f"{key}: {value}", flush=True)

    model_dir = resolve_model(args.model)
    fp_model, tok = load_causal_lm(model_dir)
    text = (ROOT / "awqconv" / "data" / "eval_heldout.txt").read_text()
    ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]
    n = ids.numel() // 512 if args.windows == 0 else min(args.windows, ids.numel() // 512)
    windows = ids[: n * 512].reshape(n, 512)
    res.update({"model": args.model, "group_size": args.group_size, "windows": n, "tokens_scored": n * 511})
    if "fp" in rows and "fp" not in res:
        save("fp", perplexity_of_ids(fp_model, windows.reshape(-1), 512, progress=False))
    del fp_model

    base = QuantConfig(group_size=args.group_size, calib_samples=args.calib_samples)
    blocks = None

    def calib():
        nonlocal blocks
        if blocks is None:
            texts = load_calibration_texts(base.calib, split=base.calib_split,
                                           text_column=base.calib_text_column, n_samples=None)
            blocks = build_blocks(texts, tok, base.calib_samples, base.calib_seq_len)[0]
        return blocks

    name = model_dir.name
    f_a = out / f"{name}-q4_0.gguf"
    f_c = out / f"{name}-q4_1-awq.gguf"
    f_b2 = out / "int-grid" / f"{name}-q4_0.gguf"
    f_b = out / "q4_0-grid" / f"{name}-q4_0.gguf"

    if "a" in rows and "a_plain_q4_0" not in res:
        if not f_a.exists():  # RTN keeps prescaled == the float weights
            gguf.write(quantized(model_dir, base.with_overrides(method="rtn"), None)[0], out, "q4_0")
        save("a_plain_q4_0", llama_cpp_ppl(f_a, windows, args.threads))

    need_c = any(r in rows for r in ("c", "d")) and not f_c.exists()
    if need_c or ("b2" in rows and not f_b2.exists()):
        awq, secs = quantized(model_dir, base, calib())
        save("seconds_awq_int_grid", secs)
        save("calib_samples_int_grid", args.calib_samples)
        gguf.write(awq, out, "q4_1-awq")
        f_b2.parent.mkdir(exist_ok=True)
        gguf.write(awq, f_b2.parent, "q4_0")
        del awq
    if "c" in rows and "c_q4_1_awq_llama_cpp" not in res:
        save("c_q4_1_awq_llama_cpp", llama_cpp_ppl(f_c, windows, args.threads))
    if "d" in rows and "d_awq_own_evaluator" not in res:
        model = reference_model(gguf.read(f_c))  # the transplant reads back bit-exact
        save("d_awq_own_evaluator", perplexity_of_ids(model, windows.reshape(-1), 512, progress=False))
    if "b2" in rows and "b2_awq_int_grid_q4_0" not in res:
        save("b2_awq_int_grid_q4_0", llama_cpp_ppl(f_b2, windows, args.threads))

    if "b" in rows and "b_awq_q4_0_grid_q4_0" not in res:
        if not f_b.exists():
            awq_q40, secs = quantized(model_dir, base, calib(), search_grid=GGUFGrid("q4_0"))
            save("seconds_awq_q4_0_grid", secs)
            save("calib_samples_q4_0_grid", args.calib_samples)
            f_b.parent.mkdir(exist_ok=True)
            gguf.write(awq_q40, f_b.parent, "q4_0")
        save("b_awq_q4_0_grid_q4_0", llama_cpp_ppl(f_b, windows, args.threads))

    if "a_plain_q4_0" in res and "b_awq_q4_0_grid_q4_0" in res:
        save("b_beats_a", res["b_awq_q4_0_grid_q4_0"] < res["a_plain_q4_0"])
    if "c_q4_1_awq_llama_cpp" in res and "d_awq_own_evaluator" in res:
        save("c_vs_d_rel", abs(res["c_q4_1_awq_llama_cpp"] - res["d_awq_own_evaluator"]) / res["d_awq_own_evaluator"])


if __name__ == "__main__":
    main()
