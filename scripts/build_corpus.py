"""Build the built-in calibration corpus and the held-out evaluation text from Python's own docstrings.

Deterministic for a given CPython version: module, class and function docstrings (``ast``) of the
running interpreter's standard library, doctest sessions removed, one document per docstring. Modules
are split by a hash of their relative path into two disjoint sets: calibration
(awqconv/data/calib_builtin.txt) and held-out evaluation (awqconv/data/eval_heldout.txt). The rule, the
Python version and the module lists go to awqconv/data/corpus_manifest.json.

    python scripts/build_corpus.py [--count-tokens]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import platform
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIB_OUT = ROOT / "awqconv" / "data" / "calib_builtin.txt"
EVAL_OUT = ROOT / "awqconv" / "data" / "eval_heldout.txt"
MANIFEST_OUT = ROOT / "awqconv" / "data" / "corpus_manifest.json"

EVAL_BUCKETS = 4  # a module is held out when int(sha256(relpath)[:8], 16) % EVAL_BUCKETS == 0
BUDGET_CHARS = {"calib": 330_000, "eval": 185_000}
MAX_CHARS_PER_MODULE = 9_000  # spread each split over many modules
MIN_DOC_CHARS, MIN_DOC_WORDS, MIN_LETTER_RATIO = 160, 25, 0.70
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "__phello__"}
SPLIT_RULE = (
    f"stdlib *.py files (relative posix path p, skipping dirs {sorted(SKIP_DIRS)} and config-*) ordered by "
    f"sha256(p); p is held out for evaluation when int(sha256(p)[:8], 16) % {EVAL_BUCKETS} == 0, "
    "otherwise it is calibration text; each split takes whole docstrings in that order, at most "
    f"{MAX_CHARS_PER_MODULE} chars per module, until its budget {BUDGET_CHARS} is reached"
)


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, file) for every standard-library module source, in hash order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), f))
    return sorted(out, key=lambda item: _digest(item[0]))


def _digest(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def is_heldout(rel: str) -> bool:
    return int(_digest(rel)[:8], 16) % EVAL_BUCKETS == 0


def docstrings(source: str) -> list[str]:
    """Cleaned docstrings of a module, its classes and functions, in ``ast.walk`` order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            text = ast.get_docstring(node, clean=True)
            if text:
                docs.append(text)
    return docs


_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)")


def to_prose(doc: str) -> str | None:
    """Drop doctest sessions and blank lines; None when what is left does not read as prose."""
    kept: list[str] = []
    in_session = False
    for line in doc.splitlines():
        if _DOCTEST.match(line):
            in_session = True
            continue
        if in_session and line.strip():  # doctest output runs until the next blank line
            continue
        in_session = False
        if line.strip():
            kept.append(line.rstrip())
    text = "\n".join(kept).strip()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if len(text) < MIN_DOC_CHARS or len(text.split()) < MIN_DOC_WORDS or letters < MIN_LETTER_RATIO * len(text):
        return None
    return text


def build() -> dict[str, dict]:
    splits: dict[str, dict] = {k: {"docs": [], "chars": 0, "modules": []} for k in BUDGET_CHARS}
    seen: set[str] = set()
    for rel, path in stdlib_files():
        split = splits["eval" if is_heldout(rel) else "calib"]
        name = "eval" if is_heldout(rel) else "calib"
        if split["chars"] >= BUDGET_CHARS[name]:
            continue
        taken = 0
        for doc in docstrings(path.read_text(encoding="utf-8", errors="replace")):
            prose = to_prose(doc)
            if prose is None or prose in seen:
                continue
            if taken + len(prose) > MAX_CHARS_PER_MODULE or split["chars"] >= BUDGET_CHARS[name]:
                break
            seen.add(prose)
            split["docs"].append(prose)
            split["chars"] += len(prose)
            taken += len(prose)
        if taken:
            split["modules"].append(rel)
    return splits


def count_tokens(text: str) -> int:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from awqconv.sources import materialize_builtin

    tok = AutoTokenizer.from_pretrained(materialize_builtin())
    return len(tok(text, verbose=False)["input_ids"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count-tokens", action="store_true", help="record SmolLM2 token counts (needs the builtin model)"
    )
    args = parser.parse_args()
    splits = build()
    manifest: dict = {
        "source": "docstrings of the CPython standard library (Python Software Foundation License)",
        "python": platform.python_version(),
        "builder": "scripts/build_corpus.py",
        "split_rule": SPLIT_RULE,
        "document_rule": "one document per docstring, blank lines removed; documents separated by one blank line",
    }
    for name, out in (("calib", CALIB_OUT), ("eval", EVAL_OUT)):
        text = "\n\n".join(splits[name]["docs"]) + "\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        entry = {
            "file": out.relative_to(ROOT).as_posix(),
            "documents": len(splits[name]["docs"]),
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "modules": splits[name]["modules"],
        }
        if args.count_tokens:
            entry["smollm2_tokens"] = count_tokens(text)
        manifest[name] = entry
        print(
            f"{out}: {entry['documents']} documents, {entry['chars']} chars, {len(entry['modules'])} modules"
            + (f", {entry['smollm2_tokens']} SmolLM2 tokens" if args.count_tokens else "")
        )
    overlap = set(manifest["calib"]["modules"]) & set(manifest["eval"]["modules"])
    assert not overlap, overlap
    MANIFEST_OUT.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
