"""``awqconv bench`` and ``awqconv chat`` on bad input: one ``error:`` line, exit 2 for usage (1 for
other errors), never a traceback; chat's streaming, EOF and non-UTF-8 input.

The artifacts are the ``tiny_qm`` Llama (context 128, vocabulary 256). The chat one also carries a
word-level tokenizer (``w6`` .. ``w255``; no newline anywhere in its vocabulary) and a ChatML-like
template, so a reply is words on one line and nothing here needs the SmolLM2 tokenizer.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from awqconv.cli import main
from awqconv.errors import UsageError
from awqconv.formats import get_format

CONTEXT = 128  # tiny_qm's max_position_embeddings
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _tokenizer_assets(vocab: int) -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = specials + ["user", "assistant", "system"] + [f"w{i}" for i in range(6, vocab)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>",
           "chat_template": TEMPLATE}
    return {"tokenizer.json": tk.to_str().encode(), "tokenizer_config.json": json.dumps(cfg).encode()}


@pytest.fixture(scope="module")
def plain(tiny_qm, tmp_path_factory):
    """A canonical artifact with no tokenizer: enough for bench."""
    out = tmp_path_factory.mktemp("cbe") / "plain"
    out.mkdir()
    get_format("canonical").write(tiny_qm, out)
    return out


@pytest.fixture(scope="module")
def chatty(tiny_qm, tmp_path_factory):
    """The same model with a tokenizer and chat template (a copy: the session's tiny_qm is shared)."""
    qm = dataclasses.replace(tiny_qm, assets=_tokenizer_assets(tiny_qm.hf_config["vocab_size"]))
    out = tmp_path_factory.mktemp("cbe") / "chatty"
    out.mkdir()
    get_format("canonical").write(qm, out)
    return out


def _run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def _error_line(r, exit_code: int) -> str:
    """The one ``error:`` line of a failed command, after checking its exit code and no traceback."""
    assert r.exit_code == exit_code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def no_rows(monkeypatch):
    """Fails the test if bench times any row: a refused run must do no work."""
    import importlib

    bench_mod = importlib.import_module("awqconv.runtime.bench")  # the package re-exports bench(), the function

    def refuse(*_a, **_k):
        raise AssertionError("a row ran before every row was checked")

    monkeypatch.setattr(bench_mod, "_bench_one", refuse)


# --- bench ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--batch-size", "0"), ("--prefill", "-5"), ("--decode", "0"), ("--prefill", "8,0"),
    ("--batch-size", ""), ("--decode", ","), ("--batch-size", "2.5"), ("--prefill", "abc"),
])
def test_bench_bad_length_is_usage_error(plain, no_rows, flag, value):
    line = _error_line(_run("bench", plain, f"{flag}={value}"), 2)
    assert flag in line and ">= 1" in line


def test_bench_negative_value_as_separate_argument(plain, no_rows):
    # "--prefill -5" (not "=-5"): click must take -5 as the value, not as an unknown option
    line = _error_line(_run("bench", plain, "--prefill", "-5"), 2)
    assert "--prefill" in line and ">= 1" in line


@pytest.mark.parametrize("args", [
    ["--prefill", "1000000"],
    ["--prefill", "8,100", "--decode", "4,29"],  # only the last row is too long: nothing runs
])
def test_bench_past_the_context_is_refused_before_any_row(plain, no_rows, args):
    r = _run("bench", plain, *args)
    line = _error_line(r, 2)
    assert f"context length of {CONTEXT}" in line
    assert r.stdout == ""


@pytest.mark.parametrize("kwargs, flag", [
    ({"batch_sizes": [0]}, "--batch-size"),
    ({"prefill_lens": [-5]}, "--prefill"),
    ({"decode_lens": [0]}, "--decode"),
    ({"batch_sizes": []}, "--batch-size"),
    ({"prefill_lens": [8.5]}, "--prefill"),
    ({"decode_lens": "4"}, "--decode"),
    ({"prefill_lens": [True]}, "--prefill"),
])
def test_bench_library_rejects_bad_lengths(plain, no_rows, kwargs, flag):
    from awqconv.runtime.bench import bench

    with pytest.raises(UsageError, match=flag):
        bench(plain, device="cpu", **kwargs)


def test_bench_library_checks_every_row_against_the_context(plain, no_rows):
    from awqconv.runtime.bench import bench

    with pytest.raises(UsageError, match=f"context length of {CONTEXT}"):
        bench(plain, prefill_lens=[8, 120], decode_lens=[4, 9], device="cpu")


def test_bench_cache_fits_the_context():
    from awqconv.runtime.bench import _cache_len
    from awqconv.runtime.generate import padded_prefill_len

    assert _cache_len(8, 4, 2048) == padded_prefill_len(8) + 4 + 1  # room for the graphed prefill's padding
    for p, d in [(100, 28), (127, 1), (1, 127), (64, 64), (65, 10)]:
        assert p + d <= _cache_len(p, d, CONTEXT) <= CONTEXT  # padding never pushes past the context


def test_bench_full_context_and_one_token_decode(plain):
    from awqconv.runtime.bench import bench, format_table

    rows = bench(plain, prefill_lens=[CONTEXT - 4], decode_lens=[4, 1], device="cpu")
    assert [(r["prefill"], r["decode"]) for r in rows] == [(CONTEXT - 4, 4), (CONTEXT - 4, 1)]
    assert all(r["prefill_tok_s"] > 0 for r in rows)
    assert rows[0]["decode_tok_s"] > 0
    assert rows[1]["decode_tok_s"] is None  # one token comes from the prefill: no decode step to time
    assert "n/a" in format_table(rows)


def test_bench_cli_runs(plain):
    r = _run("bench", plain, "--batch-size", "1,2", "--prefill", "8", "--decode", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    assert r.stdout.count("\n") == 4 and "Decode tokens/s" in r.stdout


@pytest.mark.parametrize("device", ["tpu", "nonsense:0", pytest.param("cuda", marks=NO_CUDA)])
def test_bench_bad_device(plain, no_rows, device):
    from awqconv.runtime.bench import bench

    assert "--device" in _error_line(_run("bench", plain, "--device", device), 2)
    with pytest.raises(UsageError, match="--device"):
        bench(plain, device=device)


# --- chat ----------------------------------------------------------------------------------------

CHAT = ("chat", "--max-new-tokens", "6")


def test_chat_eof_ends_cleanly(chatty):
    r = _run(*CHAT[:1], chatty, *CHAT[1:], input="")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""


def test_chat_exit_command(chatty):
    r = _run(*CHAT[:1], chatty, *CHAT[1:], input="/exit\nw7\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""


def _greedy_reply(path, text: str) -> list[str]:
    from awqconv.runtime.chat import chat

    inputs = iter([text, None])
    chunks: list[str] = []
    conv = chat(path, device="cpu", max_new_tokens=6, input_fn=lambda _p: next(inputs), output_fn=chunks.append)
    assert "".join(chunks) == conv[-1]["content"] + "\n"
    return chunks


def test_chat_streams_one_line(chatty):
    chunks = _greedy_reply(chatty, "w7 w8")
    assert len(chunks) > 2  # several deltas, then the newline that ends the reply
    assert chunks[-1] == "\n" and not any("\n" in c for c in chunks[:-1])
    # through the CLI the deltas are written as they come, with no newline between them
    r = _run(*CHAT[:1], chatty, *CHAT[1:], input="w7 w8\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "".join(chunks)


def test_default_output_writes_no_newline(capsys):
    from awqconv.runtime.chat import write_stream

    for piece in ["w7", " w8", " w9"]:
        write_stream(piece)
    assert capsys.readouterr().out == "w7 w8 w9"


def test_chat_skips_a_line_that_is_not_utf8(chatty):
    want = "".join(_greedy_reply(chatty, "w7 w8"))
    r = _run(*CHAT[:1], chatty, *CHAT[1:], input=b"\xff\xfe oops\nw7 w8\n")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    warn = r.stderr.splitlines()
    assert len(warn) == 1 and "not valid UTF-8" in warn[0] and "skipped" in warn[0]
    assert not warn[0].startswith("error:")
    assert r.stdout == want  # the bad line got no reply; the next one did


def test_chat_without_template_is_an_error(plain):
    # no tokenizer files in the artifact: a plain error (exit 1), not a usage error
    assert "tokenizer" in _error_line(_run(*CHAT[:1], plain, *CHAT[1:], input="w7\n"), 1)


def test_chat_max_new_tokens_past_the_context(chatty):
    line = _error_line(_run("chat", chatty, input="w7\n"), 2)  # the default 256 > the 128-token context
    assert "--max-new-tokens 256" in line and str(CONTEXT - 1) in line


@pytest.mark.parametrize("device", ["tpu", pytest.param("cuda", marks=NO_CUDA)])
def test_chat_bad_device(chatty, device):
    from awqconv.runtime.chat import chat

    assert "--device" in _error_line(_run(*CHAT[:1], chatty, *CHAT[1:], "--device", device, input="w7\n"), 2)
    with pytest.raises(UsageError, match="--device"):
        chat(chatty, device=device, input_fn=lambda _p: None, output_fn=lambda _t: None)
