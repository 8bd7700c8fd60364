"""Model cards (README.md) of published repos: the Hub's metadata for quantized models in the YAML
front matter, then the AWQ settings and calibration, the verify results with the machine they were
measured on, the files with their sha256, and how to load the artifact in its runtime.

Cards are a pure function of the plan (no dates of their own), so an unchanged artifact gives a
byte-identical card and a re-run sends nothing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import yaml

from ..outdir import fmt_bytes

if TYPE_CHECKING:
    from .gate import Artifact
    from .plan import Plan, Target

TITLES = {
    "hf-awq": "AWQ, AutoAWQ GEMM layout (transformers, vLLM)",
    "gguf": "GGUF (llama.cpp, Ollama, LM Studio)",
    "exllamav2": "GPTQ v1 layout (ExLlamaV2)",
    "peft": "INT4-grid checkpoint for LoRA fine-tuning (PEFT)",
    "compressed-tensors": "compressed-tensors pack-quantized W4A16 (vLLM, transformers)",
    "mlx": "MLX-LM 4-bit (Apple silicon)",
    "canonical": "awqconv canonical integers",
}
LIBRARY = {"hf-awq": "transformers", "gguf": "gguf", "exllamav2": "transformers", "peft": "transformers",
           "compressed-tensors": "transformers", "mlx": "mlx"}
TAGS = {"hf-awq": ["autoawq"], "gguf": ["gguf", "llama-cpp"], "exllamav2": ["gptq", "exllamav2"], "peft": ["peft"],
        "compressed-tensors": ["compressed-tensors", "w4a16"], "mlx": ["mlx"]}


def _meta(plan: Plan, fmt: str | None) -> dict[str, Any]:
    bits = {a.manifest.get("quantization", {}).get("w_bit", 4) for a in plan.artifacts}
    tags = ["awq", *(f"{b}-bit" for b in sorted(bits)), "awqconv", *(TAGS.get(fmt, []) if fmt else [])]
    meta: dict[str, Any] = {}
    if plan.base_model:
        meta["base_model"] = plan.base_model
        meta["base_model_relation"] = "quantized"
    if plan.license:
        meta["license"] = plan.license
    if fmt in LIBRARY:
        meta["library_name"] = LIBRARY[fmt]
    meta["pipeline_tag"] = "text-generation"
    meta["quantized_by"] = plan.quantized_by
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _front(meta: dict[str, Any]) -> list[str]:
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000).rstrip(), "---", ""]


def _src_link(plan: Plan, a: Artifact) -> str:
    src = (a.manifest.get("source") or {}).get("model") or "unknown"
    rev = (a.manifest.get("source") or {}).get("revision")
    at = f" (revision `{rev}`)" if rev else ""
    if plan.base_model:
        return f"[{plan.base_model}](/{plan.base_model}){at}"
    return f"`{src}`{at}"


def _quant_rows(a: Artifact) -> list[tuple[str, str]]:
    q: dict[str, Any] = a.manifest.get("quantization") or {}
    prov = a.provenance
    g = q.get("group_size")
    method = "round-to-nearest (no search)" if q.get("method") == "rtn" else (
        "AWQ: activation-aware scale search" + (f" (duo scaling, {q.get('n_grid')}-point grid)" if q.get("duo_scaling")
                                                else f" ({q.get('n_grid')}-point grid)")
        + (", clip search" if q.get("apply_clip") else "")
        + (", v_proj -> o_proj under GQA" if q.get("smooth_gqa_vo") else ""))
    calib = "none" if q.get("method") == "rtn" else (
        f"{q.get('calib')}: {q.get('calib_samples')} blocks x {q.get('calib_seq_len')} tokens"
        + (f", search loss on {q.get('search_tokens')} tokens" if q.get("search_tokens") else ", search loss on every token")
        + (f"; text sha256 {prov['calibration_hash'][:16]}" if prov.get("calibration_hash") else ""))
    skipped = q.get("modules_to_not_convert") or []
    return [
        ("Method", method),
        ("Weight bits", str(q.get("w_bit"))),
        ("Group size", "per channel" if g == -1 else str(g)),
        ("Zero point", "asymmetric" if q.get("zero_point") else "symmetric"),
        ("Calibration", calib),
        ("Kept in 16-bit", ", ".join(skipped) if skipped else "embeddings, norms, lm_head"),
        ("Search grid", str(prov.get("search_grid", "canonical integer grid"))),
        ("Made with", f"awqconv {a.manifest.get('awqconv_version')}, {a.manifest.get('created')}"),
    ]


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> list[str]:
    esc = [tuple(str(c).replace("|", "\\|").replace("\n", " ") for c in r) for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]


def _verify_section(a: Artifact) -> list[str]:
    v = a.verify
    out = ["## Verification", ""]
    if a.refused:
        out += [f"> **Not verified.** Published with `--force`; publish refused it as: {a.refused}.", ""]
    if v is None:
        return out + ["No `awqconv verify` record covers this artifact.", ""]
    m = v.get("machine") or {}
    hw = ", ".join(str(x) for x in (m.get("gpu"), m.get("cpu"), f"torch {m['torch']}" if m.get("torch") else None,
                                   f"torch threads {m['torch_threads']}" if m.get("torch_threads") else None) if x)
    out += [f"`awqconv verify` (awqconv {v.get('awqconv_version') or '?'}, {v.get('verified_at') or 'date unknown'}) "
            f"read this artifact back, compared it bit for bit with the canonical integers, and ran it in "
            f"awqconv's runtime against a transformers fake-quant reference on `{v.get('device')}`"
            + (f" ({hw})" if hw else "") + ".", ""]
    if v.get("same_as"):
        out += [f"Its tensors are bit-identical to `{v['same_as']}`, so the runtime rows below were measured "
                f"on `{v['same_as']}` (the same function).", ""]
    met = v.get("metrics") or {}
    key = []
    if "ppl" in met:
        key.append(f"perplexity {met['ppl']:.4f} on awqconv's held-out text")
    if "decode_tok_s" in met:
        key.append(f"decode {met['decode_tok_s']:.1f} tok/s (batch 1, {met.get('new_tokens')} new tokens, "
                   f"{v.get('device')}, awqconv's runtime)")
    if key:
        out += ["Summary: " + "; ".join(key) + ".", ""]
    rows = [(r.get("artifact", ""), r.get("check", ""), {True: "pass", False: "FAIL", None: "-"}.get(r.get("ok"), "-"),
             r.get("value", ""), r.get("detail", "")) for r in v.get("rows", [])]
    out += _table(rows, ("artifact", "check", "result", "value", "detail")) + [""]
    return out


def _usage(plan: Plan, t: Target) -> list[str]:
    a = t.artifact
    assert a is not None
    repo = t.repo_id
    rev_py = f', revision="{t.revision}"' if t.revision != "main" else ""
    rev_cli = f" --revision {t.revision}" if t.revision != "main" else ""
    local = repo.split("/")[1] + ("" if t.revision == "main" else f"-{t.revision}")
    dl = f"hf download {repo}{rev_cli} --local-dir {local}"
    if a.fmt == "hf-awq":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                "# transformers >= 5 reads AWQ checkpoints through gptqmodel (pip install gptqmodel)",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev_py}, device_map="auto")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev_py})', "```", "",
                f"vLLM: `vllm serve {repo}{rev_cli}` (it picks the `awq_marlin` or `awq` kernels from `config.json`)."]
    if a.fmt == "gguf":
        gg = next((u.path for u in t.files if u.path.endswith(".gguf")), "model.gguf")
        if t.revision == "main":
            return ["```bash", f"llama-cli -hf {repo} -p \"Hello\"        # llama.cpp", f"ollama run hf.co/{repo}        # Ollama",
                    "```", "", f"LM Studio: search for `{repo}` in Discover. Or download the file: "
                    f"`hf download {repo} {gg} --local-dir .` and run `llama-cli -m {gg}`."]
        return ["```bash", f"hf download {repo} {gg}{rev_cli} --local-dir .", f"llama-cli -m {gg} -p \"Hello\"",
                "```", "", "Ollama and LM Studio: import the downloaded file (Ollama: a Modelfile with "
                f"`FROM ./{gg}`); they read the `main` branch only."]
    if a.fmt == "exllamav2":
        return ["```bash", dl, "```", "", "```python", "from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache", "",
                f'config = ExLlamaV2Config("{local}")', "model = ExLlamaV2(config)",
                "cache = ExLlamaV2Cache(model, lazy=True)", "model.load_autosplit(cache)", "```", "",
                "TabbyAPI serves the same directory. `config.json` declares `quant_method: gptq` (v1 layout), "
                "so GPTQ loaders of transformers and vLLM read it as well."]
    if a.fmt == "peft":
        return ["```python", "import torch", "from transformers import AutoModelForCausalLM",
                "from peft import LoraConfig, get_peft_model", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev_py}, dtype=torch.bfloat16)',
                'model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", '
                'task_type="CAUSAL_LM"))', "# train, then model.save_pretrained(\"adapter/\"); never merge into the base",
                "```", "", f"Back to 4-bit, exactly: `{dl}` then `awqconv export {local} --to hf-awq,gguf "
                "--adapter adapter/ -o out/`."]
    if a.fmt == "compressed-tensors":
        return ["```bash", f"vllm serve {repo}{rev_cli}", "```", "", "```python",
                "from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # pip install compressed-tensors",
                "", "# asymmetric checkpoints load dequantized in transformers 5.25 (see the notes below)",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}"{rev_py}, '
                "quantization_config=CompressedTensorsConfig(dequantize=True))", "```"]
    if a.fmt == "mlx":
        return ["```bash", "pip install mlx-lm", f'mlx_lm.generate --model {repo} --prompt "Hello"', "```"]
    if a.fmt == "canonical":
        return ["```bash", dl, f"awqconv export {local} --to hf-awq,gguf,exllamav2 -o out/   # any format, no re-quantization",
                f"awqconv chat {local}", "```"]
    return ["```bash", dl, f"awqconv chat {local}", "```"]


def _notes(a: Artifact) -> list[str]:
    """The ``## Notes`` of the artifact's own README (layout details written by its exporter)."""
    f = a.path / "README.md"
    if not any(x["path"] == "README.md" for x in a.files) or not f.is_file():
        return []
    m = re.search(r"^## Notes\n(.*?)(?=^## |\Z)", f.read_text(encoding="utf-8", errors="replace"), re.S | re.M)
    return ["## Notes", "", m.group(1).strip(), ""] if m else []


def _bit_exact(a: Artifact) -> bool:
    rows = (a.verify or {}).get("rows") or []
    return not a.refused and any(r.get("artifact") == a.label and r.get("check") == "bit-exact linears"
                                 and r.get("ok") is True for r in rows)


def _siblings(plan: Plan, t: Target) -> list[str]:
    others = [o for o in plan.targets if o.artifact is not None and o is not t]
    if not others:
        return []
    if plan.layout == "branches":
        items = [f"[`{o.revision}`](/{o.repo_id}/tree/{o.revision}): {TITLES.get(o.artifact.fmt, o.artifact.fmt)}"
                 for o in others if o.artifact]
    else:
        items = [f"[{o.repo_id}](/{o.repo_id}): {TITLES.get(o.artifact.fmt, o.artifact.fmt)}" for o in others if o.artifact]
    return ["Other formats of the same quantization run, each verified on its own:", "",
            *[f"- {i}" for i in items], ""]


def render_card(plan: Plan, t: Target) -> str:
    a = t.artifact
    assert a is not None
    fmt_title = TITLES.get(a.fmt, a.fmt) + (f", `{a.variant}`" if a.variant else "")
    q = a.manifest.get("quantization") or {}
    lines = _front(_meta(plan, a.fmt))
    lines += [f"# {t.repo_id.split('/')[1]}" + (f" ({t.revision})" if plan.layout == "branches" else ""), "",
              f"{q.get('w_bit')}-bit weight-only quantization of {_src_link(plan, a)}: {fmt_title}, made with awqconv."
              + (" `awqconv verify` found its weights bit-identical to the canonical integers of the same run."
                 if _bit_exact(a) else ""), ""]
    lines += _siblings(plan, t)
    lines += ["## Quantization", ""] + _table(_quant_rows(a), ("setting", "value")) + [""]
    lines += _verify_section(a)
    lines += ["## Files", ""]
    lines += _table([(f"`{x['path']}`", fmt_bytes(x["size"]), f"`{x['sha256']}`") for x in a.files if x["path"] != "README.md"],
                    ("file", "size", "sha256")) + [""]
    lines += ["`awqconv-manifest.json` lists every file of this repo with its size and sha256, the source model, "
              "the quantization settings and the verify results; `awqconv verify DIR` checks a download against it.", ""]
    lines += ["## Usage", ""] + _usage(plan, t) + [""]
    lines += _notes(a)
    return "\n".join(lines).rstrip() + "\n"


def render_index_card(plan: Plan, t: Target) -> str:
    """The card of the branches layout's index revision: one row per format branch."""
    fmts = [o.artifact.fmt for o in plan.targets if o.artifact]
    lines = _front(_meta(plan, fmts[0] if len(set(fmts)) == 1 else None))
    first = plan.artifacts[0]
    lines += [f"# {plan.name}", "", f"AWQ quantization of {_src_link(plan, first)}, made once with awqconv and published "
              "in several formats, one branch each.", ""]
    rows = []
    for o in plan.targets:
        if o.artifact is None:
            continue
        v = o.artifact.verify or {}
        met = v.get("metrics") or {}
        status = "not verified" if o.artifact.refused else ("verified" + (f", ppl {met['ppl']:.4f}" if "ppl" in met else ""))
        size = sum(u.size for u in o.files if u.path not in ("README.md", "awqconv-manifest.json"))
        rows.append((f"[`{o.revision}`](/{o.repo_id}/tree/{o.revision})", TITLES.get(o.artifact.fmt, o.artifact.fmt),
                     fmt_bytes(size), status, f'`revision="{o.revision}"`'))
    lines += _table(rows, ("branch", "format", "size", "awqconv verify", "load with")) + [""]
    lines += ["Each branch has its own card (verify results, files with sha256, usage) and `awqconv-manifest.json`.", ""]
    lines += ["## Quantization", ""] + _table(_quant_rows(first), ("setting", "value")) + [""]
    return "\n".join(lines).rstrip() + "\n"
