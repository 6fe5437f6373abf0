"""recap's four summary kinds, model by model, on transcript files.

For each file and model, `recap summarize FILE --model M --kinds
overview,action_items,decisions,short --json`, then per model and kind:
- copied: the share of output sentences holding 8+ words verbatim from the
  transcript (recap's copy rate, as `summarize` reports it);
- format: the share of outputs in their kind's shape (action items and
  decisions as "- " lines or the kind's "No ..." answer; a short summary
  in one sentence of at most 30 words; an overview of one paragraph);
- names: the share of outputs naming a speaker of the transcript;
- words: mean length.
Prints one JSON object (and the texts with --texts). `--qmsum FILE
--excerpts N` adds N seeded excerpts of QMSum meetings (the gold spans of
specific queries, 200 to 450 words) as further files.

    python bench/four_kinds.py --models smollm2-135m-instruct-q4_1,smollm2-135m-qmsum-lora \
        samples/product-sync.txt samples/budget-review.txt samples/incident-retro.json \
        --qmsum ../shared/datasets/qmsum/val.jsonl --excerpts 8
"""

import argparse
import json
import os
import re
import random
import subprocess
import sys
import tempfile

KINDS = ["overview", "action_items", "decisions", "short"]
NONE_ANSWER = {"action_items": "No action items.", "decisions": "No decisions."}


def in_shape(kind, text):
    r"""Whether text has its kind's shape.

    >>> in_shape("decisions", "- Ship Friday.\n- Hire Ann.")
    True
    >>> in_shape("action_items", "Ann will ship it.")
    False
    >>> in_shape("action_items", "No action items.")
    True
    >>> in_shape("short", "Budget review: cloud spend is 8% over.")
    True
    >>> in_shape("overview", "- Ann: hi")
    False
    """
    text = text.strip()
    lines = [l for l in text.splitlines() if l.strip()]
    if kind in NONE_ANSWER:
        return text == NONE_ANSWER[kind] or (bool(lines) and all(l.startswith("- ") for l in lines))
    if kind == "short":
        return len(lines) == 1 and len(text.split()) <= 30
    return len(lines) == 1 and not text.startswith("- ")


def speakers(path):
    """Speaker names of a plain `Name: text` file or a job's utterances."""
    raw = open(path).read()
    try:
        value = json.loads(raw)
        if "meeting_transcripts" in value:
            return {t["speaker"] for t in value["meeting_transcripts"] if t.get("speaker")}
        utts = value.get("transcript", [])
        return {u["speaker"] for u in utts if isinstance(u, dict) and u.get("speaker")}
    except (json.JSONDecodeError, AttributeError):
        return {m.group(1).strip() for m in re.finditer(r"^([^:\n]{1,40}):", raw, re.M)}


def qmsum_excerpts(path, n, seed):
    """n seeded gold-span excerpts of the meetings in path (the teacher-data
    script's reader), as QMSum-shaped files."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../workers/train/scripts"))
    from distill_kinds import excerpts

    pool = list(excerpts(path, 200, 450, name="qmsum"))
    random.Random(seed).shuffle(pool)
    folder = tempfile.mkdtemp(prefix="four-kinds-")
    files = []
    for key, utts, _ in pool[:n]:
        files.append(os.path.join(folder, key + ".json"))
        turns = [{"speaker": u["speaker"], "content": u["text"]} for u in utts]
        json.dump({"meeting_transcripts": turns}, open(files[-1], "w"))
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--models", required=True)
    p.add_argument("--recap", default="target/debug/recap")
    p.add_argument("--config", default="config/recap.toml")
    p.add_argument("--texts", action="store_true", help="include every output text")
    p.add_argument("--qmsum", help="QMSum split to take excerpts from (val for selection)")
    p.add_argument("--excerpts", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.qmsum:
        args.files += qmsum_excerpts(args.qmsum, args.excerpts, args.seed)
    env = dict(os.environ, RECAP_ALLOW_DEV_CREDENTIALS=os.environ.get("RECAP_ALLOW_DEV_CREDENTIALS", "1"))
    result = {"files": [os.path.basename(f) for f in args.files], "models": {}}
    for model in args.models.split(","):
        rows = {k: [] for k in KINDS}
        for path in args.files:
            run = subprocess.run(
                [args.recap, "--config", args.config, "summarize", path, "--model", model,
                 "--kinds", ",".join(KINDS), "--json"],
                capture_output=True, text=True, env=env,
            )
            if run.returncode != 0:
                sys.exit(f"recap summarize {path} --model {model} failed:\n{run.stderr}")
            names = {n.split()[0].lower() for n in speakers(path)}
            for s in json.loads(run.stdout)["summaries"]:
                words = set(re.findall(r"[a-z]+", s["text"].lower()))
                rows[s["kind"]].append({
                    "file": path, "text": s["text"], "copied": s["copy_rate"],
                    "format": in_shape(s["kind"], s["text"]), "names": bool(names & words),
                    "words": len(s["text"].split()),
                })
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        table = {}
        for kind, rs in rows.items():
            table[kind] = {
                "copied": mean([r["copied"] for r in rs]),
                "format": mean([float(r["format"]) for r in rs]),
                "names": mean([float(r["names"]) for r in rs]),
                "words": mean([r["words"] for r in rs]),
            }
            if args.texts:
                table[kind]["outputs"] = [{"file": r["file"], "text": r["text"]} for r in rs]
        every = [r for rs in rows.values() for r in rs]
        table["all"] = {"copied": mean([r["copied"] for r in every]),
                        "format": mean([float(r["format"]) for r in every]),
                        "names": mean([float(r["names"]) for r in every])}
        result["models"][model] = table
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
