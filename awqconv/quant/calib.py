"""Calibration data: where the text comes from and how it becomes ``[n_blocks, seq_len]`` token blocks.

Sources: ``"builtin"`` (CPython docstrings shipped in ``awqconv/data``), ``"pileval"`` (AutoAWQ's
default), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, a Hugging Face dataset name, or a list
of strings. Blocks follow AutoAWQ's concatenate-and-cut rule, except that long documents are kept
(see :func:`build_blocks`); their sha256 is the calibration hash recorded in provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import CalibrationError, InputError

log = logging.getLogger(__name__)

BUILTIN = "builtin"
PILEVAL = "pileval"
PILEVAL_DATASET = "mit-han-lab/pile-val-backup"  # split "validation", as AutoAWQ
SHUFFLE_SEED = 42  # AutoAWQ shuffles Hub datasets with seed 42
HUB_DEFAULT_DOCS = 1024  # documents taken from a Hub dataset when n_samples is None
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


class CalibBlocks(NamedTuple):
    """Calibration token blocks and the sha256 of their ids (``"<n>x<seq_len>:"`` + int64 LE bytes)."""

    ids: Tensor  # int64 [n_blocks, seq_len]
    sha256: str


def load_calibration_texts(
    source: str | os.PathLike | Sequence[str],
    split: str = "train",
    text_column: str = "text",
    n_samples: int | None = None,
) -> list[str]:
    """Calibration documents from ``source``, in order; at most ``n_samples`` of them (None: all).

    - ``"builtin"``: the shipped corpus (a ``.txt`` file, rule below).
    - ``"pileval"``: ``mit-han-lab/pile-val-backup`` split ``validation`` (``split`` is ignored, as in
      AutoAWQ), shuffled with seed 42.
    - ``*.txt``: one document per paragraph; paragraphs are separated by one or more blank lines
      (lines holding only spaces/tabs); line breaks inside a paragraph are kept.
    - ``*.jsonl``: one JSON object per line, the document is its ``text_column`` field.
    - ``*.parquet``: the ``text_column`` column (read with pyarrow).
    - a directory, or any other string: a dataset (local directory, Hub ``name`` or ``name:config``)
      loaded with ``datasets.load_dataset(name, split=split)`` and shuffled with seed 42; without
      ``n_samples`` only the first HUB_DEFAULT_DOCS documents are taken.
    - a list/tuple of strings: used as given.
    """
    if isinstance(source, (list, tuple)):
        texts = list(source)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise InputError(
                f"calibration list item {bad} is {type(texts[bad]).__name__}, not str; pass a list of texts"
            )
        return _limit(texts, n_samples)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"calibration source of type {type(source).__name__} is not supported; pass a name, a path or a list of strings"
        )
    text = os.fspath(source)
    if text == BUILTIN:
        return _limit(split_paragraphs(builtin_corpus_text()), n_samples)
    path = Path(text).expanduser()
    if path.is_dir():  # a dataset directory (parquet/json/csv files or a hub snapshot): datasets reads it
        return _load_hub(str(path), None, split, text_column, n_samples)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or text.startswith((".", "/", "~")):
        return _limit(_read_local(path, text_column), n_samples)
    if text == PILEVAL:
        return _load_hub(PILEVAL_DATASET, None, "validation", "text", n_samples)
    name, _, config = text.partition(":")
    return _load_hub(name, config or None, split, text_column, n_samples)


def builtin_corpus_text() -> str:
    """The shipped calibration corpus (see ``awqconv/data/corpus_manifest.json``)."""
    return resources.files("awqconv").joinpath("data", "calib_builtin.txt").read_text(encoding="utf-8")


def split_paragraphs(text: str) -> list[str]:
    """Documents of a ``.txt`` file: paragraphs separated by blank lines, stripped, empty ones dropped."""
    parts = _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n"))
    return [p.strip() for p in parts if p.strip()]


def _limit(texts: list[str], n: int | None) -> list[str]:
    if n is not None and n <= 0:
        raise InputError(f"n_samples={n} must be positive")
    return texts if n is None else texts[:n]


def _read_local(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, column)
    if suffix == ".parquet":
        return _read_parquet(path, column)
    if suffix != ".txt":
        raise InputError(
            f"calibration file {path} has unsupported type {suffix or '(none)'}; use .txt, .jsonl or .parquet"
        )
    try:
        return split_paragraphs(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise InputError(
                    f"{path}:{lineno} is a JSON {type(row).__name__}, not an object with a {column!r} field"
                )
            if column not in row:
                raise InputError(
                    f"{path}:{lineno} has no column {column!r}; available: {', '.join(map(str, row))} "
                    "(choose one with --text-column)"
                )
            value = row[column]
            if not isinstance(value, str):
                raise InputError(f"{path}:{lineno} column {column!r} holds {type(value).__name__}, not text")
            texts.append(value)
    return texts


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow (or use a .txt/.jsonl file)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means an unreadable file
        raise InputError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    if column not in schema.names:
        raise InputError(
            f"{path} has no column {column!r}; available: {', '.join(schema.names)} (choose one with --text-column)"
        )
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    bad = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise InputError(f"{path} column {column!r} holds {type(values[bad]).__name__} values, not text")
    return [v for v in values if v is not None]


def _load_hub(name: str, config: str | None, split: str, column: str, n: int | None) -> list[str]:
    label = name + (f":{config}" if config else "")
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"calibration dataset {label} needs the `datasets` package: pip install 'awqconv[data]', "
            "or pass a local .txt/.jsonl/.parquet file or 'builtin'"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated and bad-split errors share the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"could not load calibration dataset {label} (split {split!r}) from the Hugging Face Hub ({first}); "
            "download it first or pass a local .txt/.jsonl/.parquet file or 'builtin'"
        ) from None
    if column not in ds.column_names:
        raise InputError(
            f"dataset {label} has no column {column!r}; available: {', '.join(ds.column_names)} "
            "(choose one with --text-column)"
        )
    ds = ds.shuffle(seed=SHUFFLE_SEED)
    take = min(len(ds), n if n is not None else HUB_DEFAULT_DOCS)
    return [t for t in ds.select(range(take))[column] if isinstance(t, str)]


def build_blocks(texts: Sequence[str], tokenizer: Any, n_blocks: int = 128, seq_len: int = 512) -> CalibBlocks:
    """Tokenize ``texts`` into at most ``n_blocks`` blocks of exactly ``seq_len`` tokens.

    Rules, in order:
    1. each text is ``strip()``-ed; empty texts are skipped;
    2. each is encoded on its own with the tokenizer's special tokens, so a BOS starts every
       document exactly when the tokenizer adds one (SmolLM2's does not, Llama's does);
    3. the documents are concatenated in order and cut into consecutive ``seq_len`` blocks; a block
       may start mid-document and hold several documents. Unlike AutoAWQ, which drops every document
       longer than ``seq_len``, long documents are kept and simply span several blocks;
    4. tokenizing stops once ``n_blocks * seq_len`` tokens are collected; a final partial block is
       dropped. Fewer than ``n_blocks`` full blocks is allowed (logged); fewer than one raises
       CalibrationError.
    The hash is sha256 over ``"<n>x<seq_len>:"`` followed by the ids as little-endian int64.
    """
    if n_blocks <= 0 or seq_len <= 0:
        raise InputError(f"n_blocks={n_blocks} and seq_len={seq_len} must be positive")
    need = n_blocks * seq_len
    ids: list[int] = []
    n_docs = 0
    for text in texts:
        text = text.strip()
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        n_docs += 1
        if len(ids) >= need:
            break
    n = min(n_blocks, len(ids) // seq_len)
    if n == 0:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens in {n_docs} document(s), fewer than one block of "
            f"{seq_len}; give more text or a smaller --calib-seq-len"
        )
    if n < n_blocks:
        log.warning("calibration text fills %d of %d blocks of %d tokens (%d tokens)", n, n_blocks, seq_len, len(ids))
    blocks = torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)
    return CalibBlocks(blocks, calibration_hash(blocks))


def calibration_hash(blocks: Tensor) -> str:
    """sha256 of a ``[n, seq_len]`` id tensor: ``"<n>x<seq_len>:"`` then int64 little-endian bytes."""
    n, seq_len = blocks.shape
    data = blocks.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(f"{n}x{seq_len}:".encode() + data).hexdigest()
