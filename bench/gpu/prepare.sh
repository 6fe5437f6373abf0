#!/usr/bin/env bash
# Prepares bench/gpu/run.sh on this (CPU) machine, since the GPU machine has
# no Rust toolchain and reaches no registry: CUDA 13's compiler and
# libraries from PyPI wheels, a `--features cuda` build of recap linked
# against them (sm_90: H100/H200; libcuda, the driver, is a link-time stub
# here: the GPU machine's driver provides it), the two models' GGUF headers
# and the benchmark's prompt ids. Everything lands in .gpu/ (git-ignored),
# which the call to the GPU machine carries. Then, there:
#   bench/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cuda="${RECAP_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recap/cuda13}"
root="$cuda/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
  mkdir -p "$cuda/wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$cuda/wheels" "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25" "nvidia-cuda-nvrtc==13.0.88"
  for w in "$cuda"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cuda"; done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
fi
# Unversioned names for the linker; libcuda as a stub with cudarc's symbols.
mkdir -p "$root/lib64"
for l in cublas cublasLt cudart nvrtc; do ln -sf "../lib/lib$l.so.13" "$root/lib64/lib$l.so"; done
ln -sf ../lib/libcurand.so.10 "$root/lib64/libcurand.so"
cudarc=$(dirname "$(cargo metadata --format-version 1 --locked --all-features \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')")
grep -ohE "^\s+fn (cu[A-Za-z0-9_]+)\(" "$cudarc/src/driver/sys/mod.rs" | sed -E 's/\s+fn //; s/\(//' \
  | sort -u | sed 's/.*/void &(void){}/' > "$root/lib64/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/libcuda.so.1" "$root/lib64/cuda_stub.c"
ln -sf libcuda.so.1 "$root/lib64/libcuda.so"
# x86-64-v3 rather than native: the GPU machine's CPU is another one.
PATH="$root/bin:$PATH" CUDA_HOME="$root" CUDA_COMPUTE_CAP=90 \
  CARGO_TARGET_DIR="${RECAP_CUDA_TARGET:-target/cuda}" \
  RUSTFLAGS="-C target-cpu=x86-64-v3 -L $root/lib64" \
  cargo build --release --locked --features cuda -p recap --bin recap-bench
mkdir -p .gpu
objcopy --strip-debug "${RECAP_CUDA_TARGET:-target/cuda}/release/recap-bench" .gpu/recap-bench
xz -T2 -6 -f .gpu/recap-bench   # 80 MB -> 12 MB: a call to the GPU machine carries 64 MiB
scripts/fetch-models
models="${RECAP_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recap/models}"
python3 bench/gpu/same_shape_gguf.py header "$models/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu/smollm2.header
python3 bench/gpu/same_shape_gguf.py header "$models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" .gpu/qwen.header
# The same ids as the CPU benchmark's, from the real models' tokenizers.
export LD_LIBRARY_PATH="$root/lib64:$root/lib"
bin="${RECAP_CUDA_TARGET:-target/cuda}/release/recap-bench"
"$bin" prompt --model smollm2-135m-instruct-q4_1 --out .gpu/ids-smollm2.json
"$bin" prompt --model qwen2.5-coder-0.5b-instruct-q4_k_m --out .gpu/ids-qwen.json
du -sh .gpu
