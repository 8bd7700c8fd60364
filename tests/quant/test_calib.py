"""Calibration sources (builtin, txt, jsonl, parquet, list, Hub) and the block-building rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from awqconv.errors import CalibrationError, InputError
from awqconv.quant.calib import build_blocks, load_calibration_texts
from tests.fixtures_helpers import smollm2_tokenizer, smollm2_tokenizer_with_bos

DOCS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Open the file and return a corresponding file object.\nIf the file cannot be opened, an OSError is raised.",
    "Create a new socket using the given address family, socket type and protocol number.",
]


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path: Path) -> None:
    f = tmp_path / "calib.txt"
    f.write_text("\n\n" + DOCS[0] + "\n \t\n\n\n" + DOCS[1] + "\r\n\r\n" + DOCS[2] + "\n")
    assert load_calibration_texts(str(f)) == DOCS
    assert load_calibration_texts(f, n_samples=2) == DOCS[:2]


def test_jsonl_reads_the_text_column_and_names_the_others_when_missing(tmp_path: Path) -> None:
    f = tmp_path / "calib.jsonl"
    f.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    assert load_calibration_texts(str(f), text_column="content") == DOCS
    with pytest.raises(InputError, match=r"no column 'text'; available: id, content"):
        load_calibration_texts(str(f))
    f.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(InputError, match=r"calib.jsonl:2 is not valid JSON"):
        load_calibration_texts(str(f))


def test_parquet_reads_the_text_column_and_names_the_others_when_missing(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"body": DOCS, "n": [1, 2, 3]}), f)
    assert load_calibration_texts(str(f), text_column="body") == DOCS
    with pytest.raises(InputError, match=r"no column 'text'; available: body, n"):
        load_calibration_texts(str(f))
    with pytest.raises(InputError, match=r"holds int values"):
        load_calibration_texts(str(f), text_column="n")


def test_list_of_strings_is_used_as_given() -> None:
    assert load_calibration_texts(DOCS) == DOCS
    with pytest.raises(InputError, match="item 1 is int"):
        load_calibration_texts(["ok", 3])


def test_local_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_calibration_texts(str(tmp_path / "missing.txt"))
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(InputError, match="unsupported type .csv"):
        load_calibration_texts(str(csv))


@pytest.mark.parametrize("source", ["pileval", "awqconv-tests/no-such-dataset", "wikitext:wikitext-2-raw-v1"])
def test_hub_datasets_offline_give_a_clear_input_error(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError) as err:
        load_calibration_texts(source)
    name = "mit-han-lab/pile-val-backup" if source == "pileval" else source
    assert name in str(err.value) and "local" in str(err.value)


def test_dataset_directory_goes_through_datasets_shuffled_with_seed_42(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i} talks about a different module." for i in range(50)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "train.parquet")
    got = load_calibration_texts(str(tmp_path), n_samples=10)
    expect = datasets.Dataset.from_dict({"text": docs}).shuffle(seed=42)["text"][:10]
    assert got == expect and got != docs[:10]
    with pytest.raises(InputError, match="no column 'body'; available: text"):
        load_calibration_texts(str(tmp_path), text_column="body")


def test_builtin_corpus_fills_128_blocks_of_512() -> None:
    texts = load_calibration_texts("builtin")
    assert len(texts) > 500 and all(t == t.strip() and t for t in texts)
    blocks = build_blocks(texts, smollm2_tokenizer(), n_blocks=128, seq_len=512)
    assert blocks.ids.shape == (128, 512) and blocks.ids.dtype == torch.int64


def test_builtin_corpus_is_disjoint_from_the_heldout_text() -> None:
    heldout = (Path(__file__).resolve().parents[2] / "awqconv" / "data" / "eval_heldout.txt").read_text()
    calib = set(load_calibration_texts("builtin"))
    held = {p.strip() for p in heldout.split("\n\n") if p.strip()}
    assert len(held) > 200 and not calib & held


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"]


def test_blocks_concatenate_documents_in_order_and_drop_the_tail() -> None:
    tok = smollm2_tokenizer()
    texts = DOCS * 4
    stream = [i for t in texts for i in _ids(tok, t)]
    seq_len = 16
    blocks = build_blocks(texts, tok, n_blocks=100, seq_len=seq_len)
    n = len(stream) // seq_len
    assert blocks.ids.shape == (n, seq_len)
    assert blocks.ids.flatten().tolist() == stream[: n * seq_len]


def test_long_documents_span_blocks_instead_of_being_dropped() -> None:
    tok = smollm2_tokenizer()
    long_doc = " ".join(DOCS * 10)
    ids = _ids(tok, long_doc)
    assert len(ids) > 3 * 64
    blocks = build_blocks([long_doc], tok, n_blocks=3, seq_len=64)
    assert blocks.ids.flatten().tolist() == ids[: 3 * 64]


def test_whitespace_is_stripped_and_empty_documents_are_skipped() -> None:
    tok = smollm2_tokenizer()
    clean = build_blocks(DOCS, tok, n_blocks=4, seq_len=8)
    noisy = build_blocks(["", "   \n"] + [f"\n  {d}  \n" for d in DOCS] + ["\t"], tok, n_blocks=4, seq_len=8)
    assert torch.equal(clean.ids, noisy.ids) and clean.sha256 == noisy.sha256


def test_bos_starts_every_document_when_the_tokenizer_adds_one() -> None:
    tok = smollm2_tokenizer_with_bos()
    texts = DOCS * 3
    lengths = [len(_ids(tok, t)) for t in texts]
    blocks = build_blocks(texts, tok, n_blocks=64, seq_len=16).ids.flatten().tolist()
    starts = [sum(lengths[:k]) for k in range(len(texts)) if sum(lengths[:k]) < len(blocks)]
    assert [i for i, t in enumerate(blocks) if t == tok.bos_token_id] == starts


def test_n_blocks_caps_the_result() -> None:
    blocks = build_blocks(DOCS * 10, smollm2_tokenizer(), n_blocks=3, seq_len=8)
    assert blocks.ids.shape == (3, 8)


def test_too_little_text_is_a_calibration_error() -> None:
    with pytest.raises(CalibrationError, match="fewer than one block of 512"):
        build_blocks(DOCS, smollm2_tokenizer(), n_blocks=128, seq_len=512)
    with pytest.raises(CalibrationError):
        build_blocks(["", "  "], smollm2_tokenizer(), n_blocks=1, seq_len=1)


def test_hash_is_sha256_of_the_ids_and_tracks_content() -> None:
    tok = smollm2_tokenizer()
    a = build_blocks(DOCS, tok, n_blocks=2, seq_len=8)
    expect = hashlib.sha256(b"2x8:" + a.ids.numpy().astype("<i8").tobytes()).hexdigest()
    assert a.sha256 == expect
    b = build_blocks(list(reversed(DOCS)), tok, n_blocks=2, seq_len=8)
    c = build_blocks(DOCS, tok, n_blocks=1, seq_len=16)
    assert len({a.sha256, b.sha256, c.sha256}) == 3
