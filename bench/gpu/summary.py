"""Summarizes bench/gpu/run.sh's results: GPU prefill and decode tok/s
(median and min over the runs after the first, which loads the kernels), the
CPU's on the same machine, and how far the GPU's logits are from the CPU's."""
import json
import os
import statistics
import sys

import numpy as np

out = sys.argv[1]
table = {}
for short in ("smollm2", "qwen"):
    try:
        gpu = json.load(open(os.path.join(out, f"{short}-cuda.json")))
        cpu = json.load(open(os.path.join(out, f"{short}-cpu.json")))
    except (OSError, ValueError) as e:
        table[short] = {"error": str(e)}
        continue
    warm = gpu["runs"][1:] or gpu["runs"]
    g = np.fromfile(os.path.join(out, f"{short}-cuda.logits"), dtype="<f4").astype(np.float64)
    c = np.fromfile(os.path.join(out, f"{short}-cpu.logits"), dtype="<f4").astype(np.float64)
    same = 0
    for a, b in zip(gpu["tokens"], cpu["tokens"]):
        if a != b:
            break
        same += 1
    table[short] = {
        "model": gpu["model"],
        "prompt_tokens": gpu["prompt_tokens"],
        "new_tokens": gpu["new_tokens"],
        "gpu_prefill_tok_s_median": statistics.median(r["prefill_tok_s"] for r in warm),
        "gpu_prefill_tok_s_min": min(r["prefill_tok_s"] for r in warm),
        "gpu_decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in warm),
        "gpu_decode_tok_s_min": min(r["decode_tok_s"] for r in warm),
        "gpu_first_run": gpu["runs"][0],
        "gpu_load_ms": gpu["load_ms"],
        "cpu16_prefill_tok_s": cpu["runs"][0]["prefill_tok_s"],
        "cpu16_decode_tok_s": cpu["runs"][0]["decode_tok_s"],
        "logits_rel_err": float(np.linalg.norm(g - c) / np.linalg.norm(c)) if len(g) == len(c) else None,
        "logits_finite": bool(np.isfinite(g).all()),
        "argmax_equal": int(g.argmax()) == int(c.argmax()),
        "greedy_tokens_equal_prefix": same,
    }
json.dump(table, sys.stdout, indent=1)
print()
# The table last: the device call's reply shows the end of the output.
for short, r in table.items():
    if "error" in r:
        print(short, "ERROR", r["error"])
        continue
    print(f"{short:8} gpu prefill {r['gpu_prefill_tok_s_median']:9.0f} tok/s  decode {r['gpu_decode_tok_s_median']:7.1f} tok/s"
          f" | cpu16 prefill {r['cpu16_prefill_tok_s']:7.0f} decode {r['cpu16_decode_tok_s']:6.1f}"
          f" | logits rel err {r['logits_rel_err']:.2e} argmax equal {r['argmax_equal']} same tokens {r['greedy_tokens_equal_prefix']}")
