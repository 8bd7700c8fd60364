"""The composite GitHub Action (action.yml) and the example workflow: well-formed, inputs passed to
scripts only through the environment, and the action's publish step run for real (bash, the
awqconv command) against the STAND-IN Hub of tests/publish/hub_standin.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.publish.util import TOKEN

ROOT = Path(__file__).resolve().parents[2]


def _action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_action_is_a_well_formed_composite_action() -> None:
    a = _action()
    assert a["runs"]["using"] == "composite"
    inputs = set(a["inputs"])
    text = (ROOT / "action.yml").read_text()
    assert set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", text)) <= inputs
    for step in a["runs"]["steps"]:
        if "run" in step:
            assert step["shell"] == "bash"
            assert "${{" not in step["run"], f"{step['name']}: inputs must reach scripts through env"
            subprocess.run(["bash", "-n"], input=step["run"], text=True, check=True)
    assert {"model", "repo", "formats", "layout", "private", "collection", "dry-run", "hf-token"} <= inputs


def test_example_workflow_uses_the_action_and_runs_only_when_asked() -> None:
    wf = yaml.safe_load((ROOT / ".github/workflows/publish-example.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "tags" in on["push"]
    (job,) = wf["jobs"].values()
    assert "vars.AWQCONV_PUBLISH_EXAMPLE" in job["if"]
    (use,) = [s for s in job["steps"] if s.get("uses") == "./"]
    assert set(use["with"]) <= set(_action()["inputs"])
    assert "action.yml" in (ROOT / "README.md").read_text()


def test_the_actions_publish_step_publishes(verified_out: Path, hub, tmp_path: Path) -> None:
    (step,) = [s for s in _action()["runs"]["steps"] if s.get("id") == "publish"]
    outputs = tmp_path / "github_output"
    env = {**os.environ, "OUT": str(verified_out), "REPO": "alice/Tiny", "LAYOUT": "repos", "PRIVATE": "true",
           "COLLECTION": "", "DRY_RUN": "false", "EXTRA": "--only gguf", "INPUT_TOKEN": TOKEN,
           "RUNNER_TEMP": str(tmp_path), "GITHUB_OUTPUT": str(outputs), "HF_HUB_DISABLE_XET": "1",
           "PYTHONPATH": str(ROOT), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("HF_TOKEN")  # the step exports the hf-token input
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "awqconv").write_text(f"#!/bin/sh\nexec {sys.executable} -m awqconv.cli \"$@\"\n")
    (tmp_path / "bin" / "awqconv").chmod(0o755)
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    p = subprocess.run(["bash", "-c", step["run"]], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert hub.state.repos["alice/Tiny-GGUF"].private
    out = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert json.loads(out["repos"]) == ["alice/Tiny-GGUF"]
    assert json.loads(Path(out["json"]).read_text())["targets"][0]["commit"]
