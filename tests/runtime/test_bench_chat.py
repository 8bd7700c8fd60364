"""bench() and chat() on a tiny random Llama carrying the SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from safetensors.torch import load_file

    from awqconv.api import write_artifacts
    from awqconv.config import QuantConfig
    from awqconv.formats import parse_targets
    from awqconv.model import QuantizedModel
    from awqconv.quant.grid import IntGrid
    from awqconv.sources import collect_assets, load_hf_config
    from tests.tiny_models import tiny_model_dir

    try:
        src = tiny_model_dir("LlamaForCausalLM")
    except Exception as e:  # noqa: BLE001 - the tiny fixtures borrow the builtin SmolLM2 tokenizer
        pytest.skip(f"tiny fixture model unavailable: {e}")
    sd = load_file(src / "model.safetensors")
    grid = IntGrid(group_size=32)
    lin = {k[:-7]: grid.pack(v) for k, v in sd.items() if ".layers." in k and k.endswith("_proj.weight")}
    dense = {k: v.half() for k, v in sd.items() if k[:-7] not in lin}
    qm = QuantizedModel(load_hf_config(src), QuantConfig(method="rtn", group_size=32), lin, dense,
                        assets=collect_assets(src))
    out = tmp_path_factory.mktemp("bc") / "out"
    write_artifacts(qm, parse_targets("canonical"), out)
    return out / "canonical", qm


def test_bench_rows(artifact):
    from awqconv.runtime.bench import bench, format_table

    rows = bench(artifact[0], batch_sizes=[1, 2], prefill_lens=[8], decode_lens=[4], compare_fp16=True, device="cpu")
    assert [(r["model"], r["batch"]) for r in rows] == [("int4", 1), ("int4", 2), ("fp16", 1), ("fp16", 2)]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["memory_gb"] > 0 for r in rows)
    table = format_table(rows)
    assert "Decode tokens/s" in table and table.count("\n") == len(rows) + 1


def test_chat_streams_the_greedy_reply(artifact):
    from awqconv.reference import load_tokenizer_from_assets
    from awqconv.runtime.chat import chat
    from awqconv.runtime.generate import Generator, SamplingParams
    from awqconv.runtime.model import build_decoder

    path, qm = artifact
    inputs = iter(["Hello!", "/exit"])
    chunks: list[str] = []
    conv = chat(path, device="cpu", max_new_tokens=12, input_fn=lambda _p: next(inputs), output_fn=chunks.append)
    assert [m["role"] for m in conv] == ["user", "assistant"]
    assert "".join(chunks) == conv[1]["content"] + "\n"
    # the reply is the runtime's greedy continuation of the templated prompt, stopped at EOS
    tok = load_tokenizer_from_assets(qm)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    gen = Generator(build_decoder(qm, "cpu"), max_batch=1, max_len=len(ids) + 16)
    want = gen.generate([list(ids)], SamplingParams(max_new_tokens=12, eos_token_ids=(tok.eos_token_id,))).tokens[0]
    want = [t for t in want if t != tok.eos_token_id]
    assert conv[1]["content"] == tok.decode(want, skip_special_tokens=True)
