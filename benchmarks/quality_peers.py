"""AWQ quality against AutoAWQ 0.2.9 on held-out text: two calibration / evaluation pairs.

For each calibration source the script quantizes SmolLM2-135M-Instruct (g64, asymmetric 4-bit)
with awqconv's defaults (and any ``--variants``), with RTN, and with AutoAWQ 0.2.9's own
``AwqQuantizer`` on the same documents, then scores every model's perplexity on each evaluation
text in 1024-token windows with awqconv's evaluator (fake-quant weights in fp32).

Calibration sources (documents) and evaluation texts, each pair from unrelated domains:
- ``builtin``: awqconv's shipped corpus (CPython docstrings);     eval ``pydoc``: the held-out
  modules' docstrings (``awqconv/data/eval_heldout.txt``, disjoint from the corpus).
- ``perlpod``: the POD documentation of Perl's core modules (Debian's ``perl-modules``,
  ``/usr/share/perl/5.*``), cut into documents of at most ~1500 characters at paragraph breaks;
  eval ``licenses``: the license texts of Debian's ``/usr/share/common-licenses`` (legal prose).
The scored pairs are builtin→pydoc and perlpod→licenses; the cross pairs are printed too.

AutoAWQ gets the same documents, its own block cutting (documents over 512 tokens dropped, the
rest concatenated and cut into 512-token blocks) and as many documents as fill 128 × 512 tokens,
the token budget awqconv's defaults use. On the CPU AutoAWQ's scale search snapshots the weights
with ``.cpu()``, which returns the live tensor itself there, so every grid trial compounds in place
and the model is destroyed; the snapshot is cloned (one line, patched at run time) before it runs.

    python benchmarks/quality_peers.py [--device cuda] [--variants default spread ...] [--no-autoawq]
        [--data DIR] [--eval-windows 45] [--layers N]

``--data DIR`` reads ``perlpod.jsonl`` and ``licenses.txt`` from DIR instead of /usr/share
(``--write-data DIR`` writes them there). ``--layers N`` keeps the first N decoder layers (a smoke
test, not a measurement). Writes benchmarks/results/quality_peers.json.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP = 64
N_BLOCKS, SEQ = 128, 512  # awqconv's calibration defaults; AutoAWQ gets the same token budget
EVAL_SEQ = 1024
PAIRS = (("builtin", "pydoc"), ("perlpod", "licenses"))
# variant name -> (QuantConfig overrides, quantize_model keyword arguments)
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "first8k": ({"search_tokens": 8192}, {"search_spread": False}),
    "spread8k": ({"search_tokens": 8192}, {"search_spread": True}),
    "spread16k": ({"search_tokens": 16384}, {"search_spread": True}),
    "all": ({"search_tokens": None}, {}),
    "spread8k_novo": ({"search_tokens": 8192, "smooth_gqa_vo": False}, {"search_spread": True}),
    "all_novo": ({"search_tokens": None, "smooth_gqa_vo": False}, {}),
    "spread8k_clipall": ({"search_tokens": 8192}, {"search_spread": True, "clip_all": True}),
    "all_clipall": ({"search_tokens": None}, {"clip_all": True}),
    "spread8k_clip2k": ({"search_tokens": 8192, "clip_n_tokens": 2048}, {"search_spread": True, "clip_all": True}),
    "all_noduo": ({"search_tokens": None, "duo_scaling": False}, {}),
    # the documents AutoAWQ keeps, cut its way: the same tokens as the peer
    "spread8k_awqblocks": ({"search_tokens": 8192}, {"search_spread": True, "autoawq_blocks": True}),
    "all_awqblocks": ({"search_tokens": None}, {"autoawq_blocks": True}),
}

_POD_CODE = re.compile(r"[A-Z]<<+\s(.*?)\s>>+|[A-Z]<([^<>]*)>", re.S)


# ---------------------------------------------------------------------------------------------- texts
def pod_text(source: str) -> str:
    """The prose of a Perl file's POD: command lines become headings, formatting codes are dropped."""
    out, inside = [], False
    for line in source.splitlines():
        if line.startswith("="):
            cmd, _, rest = line[1:].partition(" ")
            inside = cmd != "cut"
            if inside and cmd.startswith(("head", "item")) and rest.strip():
                out += ["", rest.strip(), ""]
            continue
        if inside:
            out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested codes
        text = _POD_CODE.sub(lambda m: m.group(1) or m.group(2) or "", text)
    return text


def perlpod_documents(root: str | None = None, max_chars: int = 1500) -> list[str]:
    """Perl core module documentation as documents of at most ``max_chars`` (paragraph-aligned)."""
    from awqconv.quant.calib import split_paragraphs

    root = root or sorted(glob.glob("/usr/share/perl/5.*"))[0]
    docs: list[str] = []
    files = glob.glob(os.path.join(root, "**", "*.pod"), recursive=True) + glob.glob(os.path.join(root, "**", "*.pm"), recursive=True)
    for path in sorted(files):
        cur = ""
        for para in split_paragraphs(pod_text(Path(path).read_text(encoding="utf-8", errors="replace"))):
            if cur and len(cur) + len(para) + 2 > max_chars:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para[:max_chars]
        if cur:
            docs.append(cur)
    return docs


def license_text() -> str:
    paths = sorted({os.path.realpath(p) for p in glob.glob("/usr/share/common-licenses/*")})
    return "\n\n".join(Path(p).read_text(encoding="utf-8") for p in paths)


def load_texts(data: Path | None) -> tuple[dict[str, list[str]], dict[str, str]]:
    from awqconv.evaluate import builtin_eval_text
    from awqconv.quant.calib import load_calibration_texts

    if data is not None:
        perl = [json.loads(line)["text"] for line in (data / "perlpod.jsonl").read_text().splitlines()]
        lic = (data / "licenses.txt").read_text(encoding="utf-8")
    else:
        perl, lic = perlpod_documents(), license_text()
    calib = {"builtin": load_calibration_texts("builtin"), "perlpod": perl}
    return calib, {"pydoc": builtin_eval_text(), "licenses": lic}


# --------------------------------------------------------------------------------------------- models
def load_float(path: Path, layers: int | None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if layers:
        m.model.layers = m.model.layers[:layers]
        m.config.num_hidden_layers = layers
    return m


def awqconv_model(path: Path, docs: list[str], tok, method: str, variant: str, device: str, layers: int | None):
    """awqconv's quantizer on ``docs`` (its own block cutting); returns the fake-quant fp32 model."""
    from awqconv.config import QuantConfig
    from awqconv.model import QuantizedModel
    from awqconv.quant.calib import build_blocks
    from awqconv.quant.pipeline import quantize_model
    from awqconv.sources import load_hf_config

    overrides, kwargs = VARIANTS[variant]
    kwargs = dict(kwargs)
    peer_cut = kwargs.pop("autoawq_blocks", False)
    cfg = QuantConfig(method=method, group_size=GROUP, calib_samples=N_BLOCKS, calib_seq_len=SEQ).with_overrides(**overrides)
    if "search_tokens" in overrides and overrides["search_tokens"] is None:
        from dataclasses import replace

        cfg = replace(cfg, search_tokens=None)
    hf = load_hf_config(path)
    if layers:
        hf = {**hf, "num_hidden_layers": layers}
    blocks = build_blocks(docs, tok, N_BLOCKS, SEQ).ids if method == "awq" else None
    if peer_cut:  # AutoAWQ's cut: each kept document encoded alone, concatenated, whole 512-token blocks
        ids = torch.tensor([t for d in autoawq_documents(docs, tok) for t in tok.encode(d.strip())])
        n = min(N_BLOCKS, ids.numel() // SEQ)
        blocks = ids[: n * SEQ].reshape(n, SEQ)
    t0 = time.time()
    out = quantize_model(load_float(path, layers), hf, cfg, blocks, device=device, progress=False, keep_prescaled=False, **kwargs)
    seconds = time.time() - t0
    qm = QuantizedModel(hf, cfg, out.linears, out.dense, out.search)
    m = load_float(path, layers)
    m.load_state_dict(qm.dequantized_state_dict(), strict=False)
    return m, seconds


def autoawq_documents(docs: list[str], tok) -> list[str]:
    """The documents AutoAWQ keeps (<= 512 tokens), as many as fill awqconv's token budget."""
    kept, total = [], 0
    for d in docs:
        n = len(tok.encode(d.strip()))
        if 0 < n <= SEQ:
            kept.append(d)
            total += n
            if total >= N_BLOCKS * SEQ:
                break
    return kept


def autoawq_model(path: Path, docs: list[str], tok, device: str, layers: int | None):
    """AutoAWQ 0.2.9's AwqQuantizer (scales and clips applied in place, export_compatible), then its
    own pseudo-quantization of every linear; returns the fake-quant fp32 model."""
    import awq.quantize.quantizer as qz
    from awq.models.llama import LlamaAWQForCausalLM

    fixed = "org_sd = {k: v.cpu().clone() for k, v in module2inspect.state_dict().items()}"
    if not getattr(qz.AwqQuantizer, "_snapshot_cloned", False):  # once per process
        src = textwrap.dedent(inspect.getsource(qz.AwqQuantizer._compute_best_scale))
        assert "org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}" in src
        src = src.replace("org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}", fixed)
        ns: dict = {}
        exec(compile(src, qz.__file__, "exec"), qz.__dict__, ns)  # noqa: S102 - the peer's own code, one line changed
        qz.AwqQuantizer._compute_best_scale = ns["_compute_best_scale"]
        qz.AwqQuantizer._snapshot_cloned = True

    class Shim:  # the parts of AutoAWQ's model wrapper its quantizer calls
        model_type = "llama"
        get_model_layers = staticmethod(LlamaAWQForCausalLM.get_model_layers)
        get_layers_for_scaling = staticmethod(LlamaAWQForCausalLM.get_layers_for_scaling)
        get_act_for_scaling = staticmethod(LlamaAWQForCausalLM.get_act_for_scaling)
        move_embed = staticmethod(LlamaAWQForCausalLM.move_embed)

    kept = autoawq_documents(docs, tok)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = load_float(path, layers, dtype)
    t0 = time.time()
    q = qz.AwqQuantizer(Shim(), model, tok, 4, GROUP, True, "gemm", kept, None, "text", True,
                        export_compatible=True, max_calib_samples=len(kept), max_calib_seq_len=SEQ)
    q.quantize()
    for layer in model.model.layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.data.to(device)
                mod.weight.data = q.pseudo_quantize_tensor(w)[0].to("cpu", dtype)
    seconds = time.time() - t0
    return model.float().cpu(), seconds, len(kept)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", nargs="*", default=["default"])
    ap.add_argument("--calibs", nargs="*", default=[c for c, _ in PAIRS])
    ap.add_argument("--no-autoawq", action="store_true")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--no-float", action="store_true")
    ap.add_argument("--eval-windows", type=int, default=45)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--write-data", type=Path, default=None)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_peers.json")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 2)
    from transformers import AutoTokenizer

    from awqconv.evaluate import perplexity_of_ids
    from awqconv.sources import resolve_model

    calib, evals = load_texts(args.data)
    if args.write_data:
        args.write_data.mkdir(parents=True, exist_ok=True)
        with open(args.write_data / "perlpod.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in calib["perlpod"])
        (args.write_data / "licenses.txt").write_text(evals["licenses"], encoding="utf-8")
        print(f"wrote {args.write_data}: {len(calib['perlpod'])} perl documents, {len(evals['licenses'])} license chars")
        return
    path = args.model or resolve_model("builtin:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    eval_ids = {k: tok(v, return_tensors="pt")["input_ids"][0] for k, v in evals.items()}

    def score(model) -> dict[str, float]:
        model = model.to(args.device)
        res = {k: perplexity_of_ids(model, ids, EVAL_SEQ, args.eval_windows, progress=False) for k, ids in eval_ids.items()}
        model.cpu()
        return res

    result = {"date": str(date.today()), "device": torch.cuda.get_device_name() if args.device == "cuda" else
              f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "group_size": GROUP, "eval_seq": EVAL_SEQ, "eval_windows": args.eval_windows, "layers": args.layers,
              "rows": []}

    def row(calib_name: str, name: str, ppl: dict, seconds: float | None = None, **extra) -> None:
        r = {"calib": calib_name, "model": name, "ppl": ppl, "seconds": None if seconds is None else round(seconds, 1), **extra}
        result["rows"].append(r)
        print(f"{calib_name:<8} {name:<18} " + "  ".join(f"{k} {v:8.4f}" for k, v in ppl.items())
              + ("" if seconds is None else f"  ({seconds:.0f} s)"), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if not args.no_float:
        row("-", "float", score(load_float(path, args.layers)))
    if not args.no_rtn:
        m, s = awqconv_model(path, calib["builtin"], tok, "rtn", "default", args.device, args.layers)
        row("-", "rtn", score(m), s)
    for c in args.calibs if not args.no_autoawq else ():
        m, s, n_docs = autoawq_model(path, calib[c], tok, args.device, args.layers)
        row(c, "autoawq-0.2.9", score(m), s, documents=n_docs)
    for v in args.variants:
        for c in args.calibs:
            m, s = awqconv_model(path, calib[c], tok, "awq", v, args.device, args.layers)
            row(c, f"awqconv:{v}", score(m), s)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
