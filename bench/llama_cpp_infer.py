"""llama.cpp side of the inference bench: the same prompt ids as recap,
prefill in llama.cpp's default batches, then 127 greedy single-token decodes
(128 new tokens with the one the prefill yields). Prints one JSON line.

Times come from llama.cpp's own counters (llama_perf_context), which leave out
Python's overhead: the strictest anchor. Peak RSS is this process's VmHWM.
"""
import argparse
import json
import time

import llama_cpp
import numpy as np


def peak_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", choices=["on", "off"], default="off")
    a = ap.parse_args()
    ids = json.load(open(a.ids))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=2048,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        flash_attn=a.flash_attn == "on",
        logits_all=False,
        verbose=False,
    )
    load_ms = (time.perf_counter() - t0) * 1e3
    n_vocab = llm.n_vocab()

    def last_logits():
        # The logits of the last evaluated token, straight from llama.cpp.
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    runs = []
    tokens = []
    for _ in range(a.runs):
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        llama_cpp.llama_perf_context_reset(llm.ctx)
        w0 = time.perf_counter()
        llm.eval(ids)
        w1 = time.perf_counter()
        tokens = []
        for i in range(a.new_tokens):
            tok = int(np.argmax(last_logits()))
            tokens.append(tok)
            if i + 1 < a.new_tokens:
                llm.eval([tok])
        w2 = time.perf_counter()
        p = llama_cpp.llama_perf_context(llm.ctx)
        runs.append({
            "prefill_ms": p.t_p_eval_ms,
            "decode_ms": p.t_eval_ms,
            "prefill_tok_s": p.n_p_eval / (p.t_p_eval_ms / 1e3),
            "decode_tok_s": p.n_eval / (p.t_eval_ms / 1e3),
            "n_p_eval": p.n_p_eval,
            "n_eval": p.n_eval,
            "wall_prefill_ms": (w1 - w0) * 1e3,
            "wall_decode_ms": (w2 - w1) * 1e3,
        })
    print(json.dumps({
        "engine": "llama.cpp",
        "flash_attn": a.flash_attn,
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": len(ids),
        "new_tokens": len(tokens),
        "load_ms": load_ms,
        "runs": runs,
        "peak_rss_kib": peak_rss_kib(),
        "tokens": tokens,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
