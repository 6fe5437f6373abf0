"""recap's LoRA adapters and Hugging Face PEFT's, each loaded by the other.

1. recap -> PEFT: the shipped adapter (adapters/smollm2-135m-qmsum) loads
   into PEFT on the same base with no missing or unexpected key, its
   tensors unchanged, and moves PEFT's next-token logits as it moves
   recap's (served unmerged and merged).
2. PEFT -> recap: PEFT writes an adapter of its own (random A and B, rank 8,
   every other layer through `layers_to_transform`); recap serves it from a
   user catalog entry, and its logits agree with PEFT's.

Both sides read the same prompt ids (`recap-bench prompt`, ~1,000 tokens of
a QMSum meeting) and the same GGUF: transformers dequantizes it to f32,
recap serves it quantized, so logits agree to quantization noise, not
bit for bit. The check: the adapter moves the logits far beyond that
noise, yet with it recap and PEFT stay as close as they are without it,
and pick the same next token (greedy continuations are compared too).
Exits 1 on a failed check.

    python bench/peft_roundtrip.py --recap-bench target/debug/recap-bench \
        --gguf ~/.cache/recap/models/<smollm2 file>.gguf
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

BASE_ID = "smollm2-135m-instruct-q4_1"
LORA_ID = "smollm2-135m-qmsum-lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def catalog_entry(model_id, adapter_dir, merge):
    """A user catalog entry serving adapter_dir on the SmolLM2 base."""
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    sha256 = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    return f"""
[[model]]
id = "{model_id}"
base = "{BASE_ID}"
family = "llama"
format = "gguf"
context_length = 8192
chat_template = "gguf"
prompt_order = "task_first"
price_per_1k_input = 0.00001
price_per_1k_output = 0.00004
licence = "test"
adapter = {{ path = "{adapter_dir}", sha256 = "{sha256}", merge = {str(merge).lower()} }}
"""


def recap_logits(recap, config, model_id, ids_path, work, env=None):
    out = os.path.join(work, f"{model_id}.logits")
    run = subprocess.run(
        [recap, "--config", config, "infer", "--model", model_id, "--ids", ids_path,
         "--new-tokens", "16", "--runs", "1", "--logits", out],
        capture_output=True, text=True, env=env,
    )
    if run.returncode != 0:
        sys.exit(f"recap-bench infer --model {model_id} failed:\n{run.stderr}")
    import numpy as np

    return np.fromfile(out, dtype="<f4"), json.loads(run.stdout.strip().splitlines()[-1])["tokens"]


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()


def torch_greedy(model, ids, n):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             repetition_penalty=1.0, pad_token_id=0)
    return out[0, len(ids):].tolist()


def compare(name, base_r, lora_r, base_t, lora_t):
    """recap against PEFT with an adapter, measured against their gap
    without one (the quantization noise: recap serves the quantized GGUF,
    transformers its f32 dequantization)."""
    import numpy as np

    norm = lambda v: float(np.linalg.norm(v))  # noqa: E731
    dr, dt = lora_r - base_r, lora_t - base_t
    row = {
        "check": name,
        "noise_without_adapter": norm(base_r - base_t),
        "gap_with_adapter": norm(lora_r - lora_t),
        "effect_recap": norm(dr),
        "effect_peft": norm(dt),
        "effect_cosine": float(dr @ dt / (norm(dr) * norm(dt))),
        "argmax_recap": int(lora_r.argmax()),
        "argmax_peft": int(lora_t.argmax()),
    }
    # The adapter moves the logits well beyond the noise, and with it the two
    # sides stay as close as they are without it.
    row["ok"] = (
        row["effect_peft"] > 3 * row["noise_without_adapter"]
        and row["gap_with_adapter"] < 1.5 * row["noise_without_adapter"]
        and row["argmax_recap"] == row["argmax_peft"]
    )
    return row


def agreeing_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recap-bench", default="target/debug/recap-bench")
    p.add_argument("--config", default="config/recap.toml")
    p.add_argument("--gguf", required=True, help=f"the GGUF of {BASE_ID}")
    p.add_argument("--adapter", default="adapters/smollm2-135m-qmsum")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    # The benchmark config's broker and database passwords are the dev ones.
    os.environ.setdefault("RECAP_ALLOW_DEV_CREDENTIALS", "1")
    work = tempfile.mkdtemp(prefix="peft-roundtrip-")
    ids_path = os.path.join(work, "ids.json")
    subprocess.run([args.recap_bench, "--config", args.config, "prompt", "--model", BASE_ID,
                    "--out", ids_path], check=True, capture_output=True)
    ids = json.load(open(ids_path))
    folder, name = os.path.split(os.path.abspath(args.gguf))

    def base():
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    rows = []
    base_r, _ = recap_logits(args.recap_bench, args.config, BASE_ID, ids_path, work)
    model = base()
    base_t = torch_logits(model, ids)

    # 1. recap -> PEFT.
    peft = PeftModel.from_pretrained(model, args.adapter).eval()
    stored = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft)
    keys_ok = set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)
    rows.append({"check": "recap adapter's tensors in PEFT (names, shapes, values)", "tensors": len(stored),
                 "ok": keys_ok})
    lora_t = torch_logits(peft, ids)
    greedy_t = torch_greedy(peft, ids, 16)
    catalog = os.path.join(work, "catalog.toml")
    adapter_dir = os.path.abspath(args.adapter)
    with open(catalog, "w") as f:
        f.write(catalog_entry("roundtrip-merged", adapter_dir, merge=True))
    env = dict(os.environ, RECAP_MODELS_CATALOG=catalog)
    for model_id, how in [(LORA_ID, "unmerged"), ("roundtrip-merged", "merged")]:
        lora_r, greedy_r = recap_logits(args.recap_bench, args.config, model_id, ids_path, work, env)
        row = compare(f"recap adapter, recap ({how}) vs PEFT", base_r, lora_r, base_t, lora_t)
        row["greedy_tokens_agreeing"] = agreeing_prefix(greedy_r, greedy_t)
        rows.append(row)

    # 2. PEFT -> recap: an adapter PEFT made, with every B nonzero.
    model = base()
    made = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                            layers_to_transform=list(range(0, 30, 2)),
                                            init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for n, t in made.named_parameters():
            if "lora_B" in n:
                t.copy_(torch.randn_like(t) * 0.1)
    peft_dir = os.path.join(work, "peft-made")
    made.save_pretrained(peft_dir)
    made_t = torch_logits(made, ids)
    with open(catalog, "a") as f:
        f.write(catalog_entry("peft-made", peft_dir, merge=False))
    made_r, greedy_r = recap_logits(args.recap_bench, args.config, "peft-made", ids_path, work, env)
    row = compare("PEFT-made adapter, recap vs PEFT", base_r, made_r, base_t, made_t)
    row["greedy_tokens_agreeing"] = agreeing_prefix(greedy_r, torch_greedy(made, ids, 16))
    rows.append(row)

    import peft as peft_pkg
    import transformers

    result = {"torch": torch.__version__, "peft": peft_pkg.__version__,
              "transformers": transformers.__version__, "prompt_tokens": len(ids), "checks": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
