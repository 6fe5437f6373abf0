"""Inference against llama.cpp: the same prompt ids (about 1,000 tokens of a
QMSum meeting in the model's chat template), 128 greedy tokens, 2 threads,
3 runs each; prefill and decode tok/s (min and median) and peak RSS.
llama.cpp runs with flash attention off and on. Prints one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = {
    "smollm2-135m-instruct-q4_1": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}


def models_dir():
    d = os.environ.get("RECAP_MODELS_DIR")
    if d:
        return d
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "recap", "models")


def run_json(args, env):
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(r):
    pre = [x["prefill_tok_s"] for x in r["runs"]]
    dec = [x["decode_tok_s"] for x in r["runs"]]
    return {
        "prefill_tok_s_median": statistics.median(pre),
        "prefill_tok_s_max": max(pre),
        "prefill_tok_s_min": min(pre),
        "decode_tok_s_median": statistics.median(dec),
        "decode_tok_s_max": max(dec),
        "decode_tok_s_min": min(dec),
        "peak_rss_mib": r["peak_rss_kib"] / 1024,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recap-bench", default=os.path.join(ROOT, "target/release/recap-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skip-llama-cpp", action="store_true")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), RECAP_THREADS=str(a.threads),
               RECAP_LOG="warn")
    env.pop("RECAP_CONFIG", None)
    out = {"threads": a.threads, "runs": a.runs, "new_tokens": a.new_tokens, "models": {}}
    tmp = tempfile.mkdtemp()
    for model in a.models.split(","):
        ids = os.path.join(tmp, f"{model}.ids.json")
        subprocess.run([a.recap_bench, "prompt", "--model", model, "--out", ids],
                       check=True, env=env, cwd=ROOT, capture_output=True)
        res = {}
        r = run_json([a.recap_bench, "infer", "--model", model, "--ids", ids,
                      "--new-tokens", str(a.new_tokens), "--runs", str(a.runs)], env)
        res["recap"] = summarize(r) | {"prompt_tokens": r["prompt_tokens"]}
        recap_tokens = r["tokens"]
        if not a.skip_llama_cpp:
            for fa in ("off", "on"):
                l = run_json([sys.executable, os.path.join(HERE, "llama_cpp_infer.py"),
                              "--model", os.path.join(models_dir(), MODELS[model]),
                              "--ids", ids, "--new-tokens", str(a.new_tokens),
                              "--runs", str(a.runs), "--threads", str(a.threads),
                              "--flash-attn", fa], env)
                same = 0
                for x, y in zip(recap_tokens, l["tokens"]):
                    if x != y:
                        break
                    same += 1
                res[f"llama.cpp fa={fa}"] = summarize(l) | {
                    "llama_cpp_python": l["llama_cpp_python"],
                    "same_greedy_prefix_tokens": same,
                }
        out["models"][model] = res
        print(json.dumps({model: res}), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
