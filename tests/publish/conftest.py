"""Fixtures of the publish tests: one verified output directory per session (a tiny fp16 Llama,
quantized with AWQ into every format and checked by `awqconv verify`), and a stand-in Hub per test
(tests/publish/hub_standin.py) that the real huggingface_hub client talks to through HF_ENDPOINT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.publish.hub_standin import HubStandIn
from tests.publish.util import FORMATS, TOKEN, run
from tests.tiny_models import tiny_model_dir


@pytest.fixture(scope="session")
def verified_out(tmp_path_factory) -> Path:
    """OUT with five artifacts and the verify.json of `awqconv verify OUT --threads 1`."""
    import awqconv

    out = tmp_path_factory.mktemp("publish") / "out"
    src = tiny_model_dir("LlamaForCausalLM", dtype=torch.float16)
    awqconv.convert(str(src), to=FORMATS, out_dir=out, group_size=32, calib_samples=2, calib_seq_len=32,
                    n_grid=4, progress=False, device="cpu")
    r = run("verify", out, "--threads", "1")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in Hub (not the Hub) on 127.0.0.1, with the client pointed at it and a write token
    of user alice; no token file, no Xet (the stand-in speaks the LFS protocol only)."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with HubStandIn() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield h
