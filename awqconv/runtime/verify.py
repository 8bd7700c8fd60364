"""``verify(dir)``: check every artifact in an output directory against the canonical model.

Per artifact (sub-directories found with ``detect_format``): structure (it reads back and every
linear validates), bit-exactness against the canonical artifact, the runtime against the fake-quant
transformers reference on fixed prompts (max |dlogit|, top-1 agreement, greedy tokens), perplexity of
both on held-out text, a greedy sample and a short decode benchmark. Rows with ``ok=None`` are
information (skipped or not applicable); any ``ok=False`` makes the report fail.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device
from ..errors import (
    AwqconvError,
    FormatConstraintError,
    InputError,
    UnsupportedArchitecture,
)
from ..formats.integrity import MANIFEST, artifact_dir, sha256_file
from ..hfconfig import context_length
from ..model import QuantizedModel
from ..outdir import read_marker
from ..packed import bitwise_equal

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
)
PPL_SEQ_LEN = 256
PPL_WINDOWS = 4
SAMPLE_TOKENS = 24
BENCH_TOKENS = 32
# runtime vs reference, relative to max |reference logit|: fp32 on the CPU is near-exact; fp16/bf16
# activations on a GPU round every layer (tests of tiny models see ~1e-3; 7B-scale fp16 ~1e-2)
REL_DLOGIT_TOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
TOP1_MIN = 0.9
PPL_REL_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class CheckRow:
    artifact: str
    check: str
    ok: bool | None  # None: information / skipped
    value: str = ""
    detail: str = ""


@dataclass
class VerifyReport:
    path: str
    device: str
    artifacts: list[dict[str, str]] = field(default_factory=list)
    rows: list[CheckRow] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.artifacts) and all(r.ok is not False for r in self.rows)

    def artifact_ok(self, name: str) -> bool | None:
        """One artifact's verdict: False if a check of it failed, True if it read back (its
        structure check passed), None when nothing beyond its checksums could be checked."""
        rows = [r for r in self.rows if r.artifact == name]
        if any(r.ok is False for r in rows):
            return False
        return True if any(r.check == "structure" and r.ok for r in rows) else None

    def add(self, artifact: str, check: str, ok: bool | None, value: Any = "", detail: str = "") -> None:
        self.rows.append(CheckRow(artifact, check, ok, str(value), detail))
        if ok is False:
            log.warning("verify %s: %s failed: %s %s", artifact, check, value, detail)

    def to_json(self) -> dict[str, Any]:
        from .. import __version__

        # per artifact: its verdict, and the manifest and file hashes it was checked against, so
        # `awqconv publish` can tell later whether what it uploads is what was verified
        arts = [{**a, "ok": self.artifact_ok(a["name"])} for a in self.artifacts]
        return {"path": self.path, "device": self.device, "ok": self.ok, "created": self.created,
                "awqconv_version": __version__, "machine": self.machine, "artifacts": arts,
                "rows": [asdict(r) for r in self.rows], "samples": self.samples, "metrics": self.metrics}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    def table(self) -> str:
        """A plain-text table (artifact, check, result, value, detail) for the CLI."""
        head = ("artifact", "check", "result", "value", "detail")
        body = [(r.artifact, r.check, {True: "ok", False: "FAIL", None: "-"}[r.ok], r.value, r.detail)
                for r in self.rows]
        widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(4)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in [head, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        lines.append(f"\n{'PASS' if self.ok else 'FAIL'}: {len(self.artifacts)} artifact(s) in {self.path}")
        return "\n".join(lines)


# files whose presence marks a directory as meant to be a model, detected or not
_MODEL_FILES = ("config.json", "awqconv.json", MANIFEST)
_MODEL_SUFFIXES = (".safetensors", ".gguf")


def find_artifacts(path: Path) -> list[tuple[str, Path, str | None]]:
    """``(label, path, format)`` for ``path`` itself if it is an artifact, else each sub-directory that
    is or should be one. ``format`` is None for a directory that looks like an artifact (a model file,
    a config, a checksum manifest) but cannot be read, and for an entry the output's
    ``awqconv-output.json`` lists that is gone: verify fails those instead of dropping them."""

    from ..formats import require_path

    path = require_path(path)
    if not path.is_dir() or _looks_like_artifact(path):
        fmt = _safe_detect(path)
        if fmt is None and not (artifact_dir(path) / MANIFEST).is_file():
            from ..formats import read_artifact

            read_artifact(path)  # not awqconv's and unreadable: its error, and no report written there
        return [(path.name or str(path), path, fmt)]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _looks_like_artifact(sub):
            found.append((sub.name, sub, _safe_detect(sub)))
    marker = read_marker(path)
    for name in (marker or {}).get("entries", []):
        if not (path / str(name)).exists():
            found.append((str(name), path / str(name), None))
    return found


def _safe_detect(path: Path) -> str | None:
    from ..formats import detect_format

    try:
        return detect_format(path)
    except (OSError, AwqconvError):
        return None


def _looks_like_artifact(path: Path) -> bool:
    if path.is_file():
        return path.suffix in _MODEL_SUFFIXES
    if _safe_detect(path) is not None:
        return True
    try:
        return any(f.name in _MODEL_FILES or f.name.endswith(_MODEL_SUFFIXES) for f in path.iterdir())
    except OSError:
        return True


def _first_line(text: str, limit: int = 300) -> str:
    """The first line of a message, shortened at a word boundary with an ellipsis when too long."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " ..."


def _compare_canonical(rep: VerifyReport, label: str, qm: QuantizedModel, canon: QuantizedModel) -> bool:
    """Add the exactness rows; True when every linear and dense tensor is bit-identical."""
    missing = sorted(set(canon.linears) ^ set(qm.linears))
    if missing:
        rep.add(label, "bit-exact linears", False, f"{len(missing)} differ in name", ", ".join(missing[:3]))
        return False
    bad = [n for n in canon.linears if not canon.linears[n].equal(qm.linears[n])]
    rep.add(label, "bit-exact linears", not bad, f"{len(canon.linears) - len(bad)}/{len(canon.linears)} equal",
            ", ".join(bad[:3]))
    shared = sorted(set(canon.dense) & set(qm.dense))
    diff, cast = [], 0
    for k in shared:
        a, b = canon.dense[k], qm.dense[k]
        if bitwise_equal(a, b):
            continue
        if a.shape == b.shape and torch.equal(a.to(b.dtype), b):  # the format's dtype (bf16 -> fp16, say)
            cast += 1
        else:
            diff.append(k)
    extra = sorted(set(canon.dense) ^ set(qm.dense))
    detail = (f"{cast} equal to canonical cast to the format's dtype; " if cast else "") + (
        f"keys only on one side: {', '.join(extra[:3])}" if extra else "")
    rep.add(label, "dense tensors", not diff, f"{len(shared) - len(diff)}/{len(shared)} equal",
            (", ".join(diff[:3]) + "; " if diff else "") + detail)
    return not bad and not diff and not cast and not extra


def _prompt_ids(tok, prompts: list[str], vocab: int) -> list[list[int]]:
    if tok is None:  # no tokenizer: fixed pseudo-random ids
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (8 + 3 * i,), generator=g).tolist() for i in range(len(prompts))]
    return [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]


def verify(path: str | Path, *, prompts: list[str] | None = None, eval_text: str | None = None,
           device: str | torch.device | None = None, max_new_tokens: int = SAMPLE_TOKENS,
           ppl_windows: int = PPL_WINDOWS, ppl_seq_len: int = PPL_SEQ_LEN, bench: bool = True,
           recheck_identical: bool = False, threads: int | None = None) -> VerifyReport:
    """Verify every artifact under ``path``; see the module docstring. Never raises for a failed
    check (the report says ``ok=False``); raises InputError when ``path`` holds no artifact.

    An artifact that reads back bit-identical to the canonical one (every linear and dense tensor)
    computes the same function in the runtime, so its runtime checks are those of the canonical
    artifact unless ``recheck_identical`` is set. ``threads`` sets torch's CPU threads for the call
    (restored after): on an oversubscribed machine 1 thread was 15x faster per decode step than 2."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _verify(path, prompts, eval_text, device, max_new_tokens, ppl_windows, ppl_seq_len, bench,
                       recheck_identical)
    finally:
        torch.set_num_threads(saved)


def _verify(path, prompts, eval_text, device, max_new_tokens, ppl_windows, ppl_seq_len, bench,
            recheck_identical) -> VerifyReport:
    from ..formats import read_artifact
    from ..formats.integrity import check

    device = resolve_device(device)
    rep = VerifyReport(str(path), str(device), machine=_machine(device),
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    arts = find_artifacts(Path(path))
    if not arts:
        raise InputError(f"no awqconv artifact found in {path} or its sub-directories")
    prompts = list(prompts or DEFAULT_PROMPTS)
    models: dict[str, QuantizedModel] = {}
    for label, p, fmt in arts:
        rep.artifacts.append({"name": label, "format": fmt or "?", "path": str(p)})
        t0 = time.perf_counter()
        if not p.exists():
            rep.add(label, "structure", False, "missing", f"listed in the output's awqconv-output.json but {p} is gone")
            continue
        try:
            manifest = check(p)
            if manifest is not None:
                rep.artifacts[-1].update(manifest_sha256=sha256_file(artifact_dir(p) / MANIFEST),
                                         files=manifest["files"])
            rep.add(label, "checksums", manifest is not None or None,
                    f"{len(manifest['files'])} files match" if manifest else "none recorded",
                    "" if manifest else f"no {MANIFEST}: not written by awqconv, bytes not checked")
        except AwqconvError as e:
            rep.add(label, "checksums", False, type(e).__name__, _first_line(str(e)))
            continue
        try:
            qm, fmt = read_artifact(p)
            rep.artifacts[-1]["format"] = fmt
        except FormatConstraintError as e:  # a lossy variant: not decodable to canonical integers
            rep.add(label, "structure", None, "not canonical", _first_line(str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any reader failure is this artifact's failed check
            rep.add(label, "structure", False, type(e).__name__, _first_line(str(e)))
            continue
        models[label] = qm
        q0 = next(iter(qm.linears.values()), None)
        rep.add(label, "structure", bool(qm.linears), f"{len(qm.linears)} linears",
                f"{fmt}, {q0.bits if q0 else '?'}-bit g{q0.group_size if q0 else '?'}, {qm.architecture}, "
                f"read in {time.perf_counter() - t0:.1f}s")
    canon_label = next((lb for lb, _, f in arts if f == "canonical" and lb in models), None)
    broken_canon = next((lb for lb, _, f in arts if f == "canonical" and lb not in models), None)
    to_run = dict(models)
    for label, qm in models.items():
        if canon_label is None:
            why = f"{broken_canon} failed its own checks" if broken_canon else "no canonical artifact"
            rep.add(label, "bit-exact linears", None, "not compared", why)
        elif label != canon_label:
            if _compare_canonical(rep, label, qm, models[canon_label]) and not recheck_identical:
                del to_run[label]
                next(a for a in rep.artifacts if a["name"] == label)["same_as"] = canon_label
                rep.add(label, "runtime checks", None, f"same as {canon_label}", "bit-identical tensors: same function")
    if not models:
        return rep
    base = models[canon_label] if canon_label else next(iter(models.values()))
    _run_models(rep, base, to_run, prompts, eval_text, device, max_new_tokens, ppl_windows, ppl_seq_len, bench)
    return rep


def _run_models(rep, base, models, prompts, eval_text, device, max_new_tokens, ppl_windows, ppl_seq_len, bench):
    from ..evaluate import perplexity_of_ids
    from ..reference import load_tokenizer_from_assets
    from .generate import Generator, SamplingParams
    from .lm import RuntimeLM
    from .model import build_decoder

    try:
        tok = load_tokenizer_from_assets(base)
    except AwqconvError as e:
        tok = None
        rep.add("*", "tokenizer", None, "none", _first_line(str(e)))
    vocab = base.hf_config.get("vocab_size", 32000)
    ctx = context_length(base.hf_config)
    if ctx is not None:  # never score windows longer than the model's context
        ppl_seq_len = min(ppl_seq_len, ctx)
    ids = _prompt_ids(tok, prompts, vocab)
    text = eval_text if eval_text is not None else _default_eval_text()
    ppl_ids = None
    if tok is not None and text:
        ppl_ids = tok(text, return_tensors="pt", verbose=False)["input_ids"][0]
    refs: dict[int, _Reference] = {}  # one fake-quant reference per distinct artifact (dense dtypes differ)
    for label, qm in models.items():
        try:
            dec = build_decoder(qm, device)
        except UnsupportedArchitecture as e:
            rep.add(label, "runtime", None, "not supported", _first_line(str(e)))
            continue
        dt = dec.dtype
        try:
            r = refs.setdefault(id(qm), _Reference.build(qm, ids, device, max_new_tokens, ppl_ids, ppl_seq_len, ppl_windows))
        except Exception as e:  # noqa: BLE001
            rep.add(label, "reference model", False, type(e).__name__, _first_line(str(e)))
            continue
        ref_logits, ref_greedy, ref_ppl = r.logits, r.greedy, r.ppl
        if ref_ppl is not None:
            rep.add(label, "reference perplexity", None, f"{ref_ppl:.4f}", f"{ppl_windows} x {ppl_seq_len} tokens")
        need = max(len(x) for x in ids) + max(max_new_tokens, BENCH_TOKENS) + 8
        gen = Generator(dec, max_batch=1, max_len=max(need, ppl_seq_len if ppl_ids is not None else 0))
        m: dict[str, Any] = {}
        # logits on the prompts
        worst, agree, n = 0.0, 0, 0
        for x, rl in zip(ids, ref_logits):
            dec.key_valid.zero_()
            with torch.no_grad():
                lg = dec(torch.tensor([x], device=device), torch.arange(len(x), device=device)[None],
                         torch.tensor(0, device=device), len(x), last_only=False)[0].float()
            worst = max(worst, ((lg - rl).abs().max() / rl.abs().max().clamp(min=1e-6)).item())
            agree += int((lg.argmax(-1) == rl.argmax(-1)).sum())
            n += len(x)
        tol = REL_DLOGIT_TOL.get(dt, 3e-2)
        rep.add(label, "logits vs reference", worst <= tol, f"max|dlogit|/max|logit| {worst:.2e}", f"tol {tol:.0e}")
        rep.add(label, "top-1 vs reference", agree / n >= TOP1_MIN, f"{agree}/{n}", f"min {TOP1_MIN:.0%}")
        # greedy tokens
        res = [gen.generate([x], SamplingParams(max_new_tokens=max_new_tokens)).tokens[0] for x in ids]
        same = sum(a == b for a, b in zip(res, ref_greedy))
        first = [next((i for i, (a, b) in enumerate(zip(rr, g)) if a != b), None) for rr, g in zip(res, ref_greedy)]
        # a divergence is explained when the reference itself ranks the two tokens within the
        # logit tolerance at that step (a near-tie that rounding may flip either way)
        tol = REL_DLOGIT_TOL.get(dt, 3e-2)
        ties = [r.margin(x, g[:i], g[i], rr[i]) <= tol for x, rr, g, i in zip(ids, res, ref_greedy, first) if i is not None]
        exact_expected = dt == torch.float32
        detail = "" if same == len(ids) else (
            f"first divergence at tokens {first}; {sum(ties)}/{len(ties)} at reference near-ties (<= {tol:.0e})")
        rep.add(label, "greedy vs reference", all(ties) if exact_expected else None,
                f"{same}/{len(ids)} prompts identical", detail)
        if tok is not None:
            rep.samples[label] = prompts[0] + tok.decode(res[0], skip_special_tokens=True)
        # perplexity
        if ppl_ids is not None:
            ppl = perplexity_of_ids(RuntimeLM(dec), ppl_ids, ppl_seq_len, ppl_windows, batch_size=1, progress=False)
            rel = abs(ppl - ref_ppl) / ref_ppl
            ptol = PPL_REL_TOL.get(dt, 1e-2)
            rep.add(label, "perplexity", rel <= ptol, f"{ppl:.4f}", f"reference {ref_ppl:.4f}, rel diff {rel:.1e}, tol {ptol:.0e}")
            m["ppl"] = ppl
        if bench:
            m.update(_short_bench(gen, ids[0], device))
            rep.add(label, "decode speed", None, f"{m['decode_tok_s']:.1f} tok/s",
                    f"batch 1, {m['new_tokens']} new tokens, {device.type}, prefill {m['prefill_tok_s']:.0f} tok/s")
        rep.metrics[label] = m
        del gen, dec
    refs.clear()


@dataclass
class _Reference:
    """The transformers fake-quant model of one artifact and its outputs on the fixed prompts."""

    model: Any
    device: torch.device
    logits: list[torch.Tensor]
    greedy: list[list[int]]
    ppl: float | None

    @classmethod
    def build(cls, qm, ids, device, max_new_tokens, ppl_ids, ppl_seq_len, ppl_windows) -> "_Reference":
        from ..evaluate import perplexity_of_ids
        from ..reference import reference_model

        dtype = torch.float32 if device.type == "cpu" else qm.dtype  # fp32 on the CPU when no GPU
        ref = reference_model(qm, dtype=dtype).to(device)
        with torch.no_grad():
            logits = [ref(torch.tensor([x], device=device)).logits[0].float() for x in ids]
            greedy = [ref.generate(torch.tensor([x], device=device), max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, do_sample=False)[0, len(x):].tolist() for x in ids]
        ppl = None
        if ppl_ids is not None:
            ppl = perplexity_of_ids(ref, ppl_ids, ppl_seq_len, ppl_windows, batch_size=1, progress=False)
        return cls(ref, device, logits, greedy, ppl)

    def margin(self, prompt: list[int], prefix: list[int], ref_tok: int, run_tok: int) -> float:
        """(logit[ref_tok] - logit[run_tok]) / max|logit| of the reference after prompt + prefix."""
        with torch.no_grad():
            lg = self.model(torch.tensor([prompt + prefix], device=self.device)).logits[0, -1].float()
        return float((lg[ref_tok] - lg[run_tok]) / lg.abs().max().clamp(min=1e-6))


def _short_bench(gen, prompt: list[int], device: torch.device, new: int = 0) -> dict[str, Any]:
    from .generate import SamplingParams

    new = new or BENCH_TOKENS
    gen.generate([prompt], SamplingParams(max_new_tokens=4))  # warm-up (and graph capture on GPU)
    r = gen.generate([prompt], SamplingParams(max_new_tokens=new))
    return {"decode_tok_s": r.decode_steps / max(r.decode_s, 1e-9), "prefill_tok_s": len(prompt) / max(r.prefill_s, 1e-9),
            "new_tokens": new}


def _machine(device: torch.device) -> dict[str, Any]:
    """What the measurements ran on (decode speed means little without it)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    m: dict[str, Any] = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                         "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(device)
    return m


def _default_eval_text() -> str:
    from ..evaluate import builtin_eval_text

    return builtin_eval_text()
