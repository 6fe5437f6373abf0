"""PyTorch + PEFT on CPU: the training-speed anchor of `recap-bench train`.

The same work as recap's side: the SmolLM2-135M base from the same GGUF
(dequantized to f32 by transformers), LoRA of rank R (alpha 2R, no dropout)
on all seven projections, QMSum train examples cut to --seq-len tokens, and
for each one a forward and a backward pass with the loss on its last
quarter (the lm head on those rows only, as recap computes it). Prints one
JSON line: tokens/s per round, the best, and peak RSS.

    python bench/train_anchor.py --gguf ~/.cache/recap/models/<file>.gguf \
        --data ../shared/datasets/qmsum/train.jsonl
"""

import argparse
import json
import os
import resource
import time


def examples(path, tokenizer, n, seq_len):
    """The first n QMSum span examples of at least seq_len tokens, cut to it."""
    out = []
    with open(path) as f:
        for line in f:
            meeting = json.loads(line)
            turns = meeting["meeting_transcripts"]
            for q in meeting["specific_query_list"]:
                text = "\n".join(
                    f"{t['speaker']}: {t['content']}"
                    for a, b in q["relevant_text_span"]
                    for t in turns[int(a) : int(b) + 1]
                )
                ids = tokenizer(f"{q['query']}\n{text}\n{q['answer']}")["input_ids"]
                if len(ids) >= seq_len:
                    out.append(ids[:seq_len])
                if len(out) == n:
                    return out
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--examples", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    decoder = model.get_base_model().model
    lm_head = model.get_base_model().lm_head
    items = [torch.tensor([ids]) for ids in examples(args.data, tokenizer, args.examples, args.seq_len)]
    if len(items) < args.examples:
        raise SystemExit(f"{args.data}: only {len(items)} examples of {args.seq_len} tokens")

    rounds = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        tokens = 0
        for ids in items:
            n = ids.shape[1]
            start = n * 3 // 4
            hidden = decoder(input_ids=ids).last_hidden_state
            # Row i predicts token i + 1: the target tokens start..n-1.
            logits = lm_head(hidden[:, start - 1 : n - 1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[0, start:n])
            loss.backward()
            model.zero_grad(set_to_none=True)
            tokens += n
        rounds.append(tokens / (time.perf_counter() - started))
    print(
        json.dumps(
            {
                "engine": "pytorch+peft",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "examples": len(items),
                "seq_len": args.seq_len,
                "rank": args.rank,
                "tokens_per_s": rounds,
                "best_tokens_per_s": max(rounds),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
