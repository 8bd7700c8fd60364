"""``verify``, ``bench`` and ``chat`` on every registry family (the tiny fixture models, a canonical
artifact each, CPU): verify passes every check (logits, top-1, greedy tokens and perplexity against
the fake-quant reference; a decode benchmark); ``awqconv bench`` prints a row per model, batch size
1 and 2, INT4 and the float baseline; ``awqconv chat`` streams a reply with the model's chat template.
Mixtral goes through ``awqconv quantize`` first, so its artifact carries the quantizer's expert names.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from awqconv.api import write_artifacts
from awqconv.cli import main
from awqconv.formats import parse_targets
from awqconv.runtime.verify import verify
from tests.fixtures_helpers import qm_from_dir
from tests.tiny_models import TINY_ARCHS, tiny_model_dir


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_verify_bench_chat(arch, tmp_path):
    out = tmp_path / "out"
    if arch == "MixtralForCausalLM":
        r = _run("quantize", str(tiny_model_dir(arch)), "--method", "rtn", "-g", "32", "-q", "--to", "canonical",
                 "-o", str(out))
        assert r.exit_code == 0, r.output
    else:
        write_artifacts(qm_from_dir(tiny_model_dir(arch), group_size=32), parse_targets("canonical"), out)
    rep = verify(out, device="cpu", max_new_tokens=6, ppl_windows=1, ppl_seq_len=64, threads=1)
    assert rep.ok, rep.table()
    rows = {r.check: r for r in rep.rows}
    assert rows["logits vs reference"].ok and rows["greedy vs reference"].ok and rows["perplexity"].ok
    assert rows["decode speed"].value.endswith("tok/s")
    r = _run("bench", str(out / "canonical"), "--batch-size", "1,2", "--prefill", "8", "--decode", "4",
             "--compare-fp16", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = [line for line in r.output.splitlines() if line.startswith("|")][2:]
    assert [[c.strip() for c in line.split("|")[1:3]] for line in table] == [
        [m, str(b)] for m in ("int4", "fp16") for b in (1, 2)]
    r = _run("chat", str(out / "canonical"), "--device", "cpu", "--max-new-tokens", "6", stdin="Hello!\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.output.strip()
