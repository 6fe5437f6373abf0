#!/usr/bin/env bash
# Installs the benchmark anchors into one venv outside the repo:
# llama.cpp (llama-cpp-python built from source, native, AMX off), Celery,
# and PyTorch with PEFT and transformers (training speed, adapter round trip;
# PyPI's torch wheel brings its CUDA libraries, a few GB, unused on CPU).
# Idempotent: what the venv already imports is kept.
set -euo pipefail
VENV="${RECAP_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recap/bench-venv}"
LLAMA_CPP_PYTHON_VERSION=0.3.16
CELERY_VERSION=5.5.3
TORCH_STACK=(torch==2.15.0 peft==0.21.2 transformers==5.25.0 gguf==0.19.0)

if ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake ninja-build
fi
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, peft, transformers, gguf" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_STACK[@]}"
fi
if "$PY" -c "import llama_cpp, celery, psycopg, pika" 2>/dev/null; then
  echo "anchors ready in $VENV"; exit 0
fi
"$PY" -m pip install -q --upgrade pip
# --no-build-isolation: use Debian's cmake rather than compiling one; so the
# build backend is installed first.
"$PY" -m pip install -q "scikit-build-core[pyproject]>=0.9" typing-extensions numpy diskcache jinja2
# These VMs advertise AMX but SIGILL on it: native build with AMX turned off.
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"
export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CXXFLAGS="$CFLAGS"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
"$PY" -m pip install -q --no-build-isolation --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
"$PY" -m pip install -q "celery==$CELERY_VERSION" "psycopg[binary]==3.2.9" "pika==1.3.2" "psutil==7.0.0"
"$PY" -c "import llama_cpp, celery, psycopg, pika; print('anchors ready:', llama_cpp.__version__, celery.__version__)"
