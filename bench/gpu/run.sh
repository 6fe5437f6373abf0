#!/usr/bin/env bash
# The GPU benchmark, run on the GPU machine (an H100 or H200 lent for a few
# minutes, no network, no Rust toolchain): everything it needs comes with the
# call, prepared by bench/gpu/prepare.sh in .gpu/ (the `--features cuda`
# binary, the models' GGUF headers, the prompt ids). For each model it writes
# a GGUF of the real shapes and types with random values, times prefill and
# 128-token greedy decode on the GPU (5 runs; the first loads the kernels),
# and compares the prompt's logits with the CPU's on the same file (part
# `infer`); then runs the compact-tier batch benchmark (N = 1, 4, 8, 16 jobs
# decoded together) and the 4-kind job on the GPU (part `batch`).
#   bench/gpu/run.sh [infer] [batch]      (both by default)
# Results: $OUT (or /tmp/recap-gpu): the summaries as JSON, the rest in
# details.tar.gz (the device call returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
parts=" ${*:-infer batch} "
out="${OUT:-/tmp/recap-gpu}"
mkdir -p "$out" /tmp/recap-gpu-models
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$out/gpu.txt"
# CUDA's libraries come with the machine's PyTorch (pip wheels): find them.
libs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  f=$(find / -xdev -name "$lib" -not -path "*/proc/*" 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "missing $lib"; exit 1; }
  libs="$libs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" RECAP_LOG=warn
# The binary travels xz-compressed (80 MB as it is; a call carries 64 MiB).
[ -f .gpu/recap-bench ] || python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.gpu/recap-bench.xz'), open('.gpu/recap-bench','wb'))" || exit 1
chmod +x .gpu/recap-bench
for m in smollm2-135m-instruct-q4_1:smollm2 qwen2.5-coder-0.5b-instruct-q4_k_m:qwen; do
  id=${m%%:*} short=${m##*:}
  file=/tmp/recap-gpu-models/$short.gguf
  python3 bench/gpu/same_shape_gguf.py expand ".gpu/$short.header" "$file" || exit 1
  # A failure is reported and the rest still runs: the machine is lent once.
  for dev in cuda cpu; do
    [[ $parts == *" infer "* ]] || break
    if [ $dev = cuda ]; then runs=5 new=128 threads=2; else runs=1 new=16 threads=16; fi
    RECAP_DEVICE=$dev RAYON_NUM_THREADS=$threads timeout 240 .gpu/recap-bench infer --model "$id" \
      --file "$file" --ids ".gpu/ids-$short.json" --runs $runs --new-tokens $new \
      --logits "$out/$short-$dev.logits" > "$out/$short-$dev.json" 2> "$out/$short-$dev.log" \
      || { echo "$short on $dev failed:"; tail -20 "$out/$short-$dev.log"; }
  done
  if [[ $parts == *" batch "* ]]; then
    RECAP_DEVICE=cuda timeout 300 .gpu/recap-bench batch --model "$id" --file "$file" \
      --jobs 16 --sizes 1,4,8,16 > "$out/batch-$short.json" 2> "$out/batch-$short.log" \
      || { echo "batch $short failed:"; tail -20 "$out/batch-$short.log"; }
    RECAP_DEVICE=cuda timeout 200 .gpu/recap-bench kinds --model "$id" --file "$file" \
      > "$out/kinds-$short.json" 2> "$out/kinds-$short.log" \
      || { echo "kinds $short failed:"; tail -20 "$out/kinds-$short.log"; }
    cat "$out/batch-$short.json" "$out/kinds-$short.json"
  fi
done
if [[ $parts == *" infer "* ]]; then
  python3 bench/gpu/summary.py "$out" > "$out/summary.txt"
  tail -2 "$out/summary.txt"
fi
(cd "$out" && tar czf details.tar.gz --remove-files ./*.log ./*.logits ./*-cuda.json ./*-cpu.json 2>/dev/null)
ls "$out"
