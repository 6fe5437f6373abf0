#!/usr/bin/env python3
"""Training examples for recap's four summary kinds, written by a teacher.

QMSum has query answers, but no action items, decisions or one-line
summaries, and its whole-meeting summaries are longer than a training
example. This script takes seeded excerpts of QMSum **train** meetings (the
gold spans of its specific queries, each excerpt once), has a teacher model
(by default Qwen2.5-Coder-1.5B: the 0.5B large tier's lists
repeat the transcript) summarize each with `recap summarize` in all four
kinds, and writes `recap train --data jsonl:` lines: the excerpt, the kind
and the teacher's text as the target. A list whose every line says there
is nothing ("- Alice: No action items.") becomes the kind's own "No ..."
answer, and such lines beside real items are left out. Outputs that break
their kind's format (a list kind without "- " lines, an empty text, a
one-line summary over 40 words) or copy the transcript (over a quarter of
their sentences hold 8+ words verbatim: recap's copy rate) are dropped and
counted: the student is to learn the format and not to copy. A list line
that holds 8+ words of the transcript verbatim is left out as well (a
list of only such lines is dropped): a student that saw lists written
from transcript lines copies lines into its own. A "No ..."
answer is kept only while such answers stay under --max-none-share of the
list targets written: excerpts seldom decide or assign, and a student
trained on two thirds "none" (the first run here) answers "none" always.

Resumable: excerpts already in --out are skipped, so a killed run goes on.

    workers/train/scripts/distill_kinds.py --recap target/debug/recap \
        --qmsum ../shared/datasets/qmsum/train.jsonl --excerpts 48 \
        --out adapters/data/qmsum-train-kinds.jsonl
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile

KINDS = ["overview", "action_items", "decisions", "short"]
NONE_ANSWER = {"action_items": "No action items.", "decisions": "No decisions."}


def excerpts(path, min_words, max_words, name="qmsum-train"):
    """Each distinct gold span of a specific query, as (key, utterances, query);
    bench/four_kinds.py takes its val excerpts here too."""
    seen = set()
    with open(path) as f:
        for n, line in enumerate(f):
            meeting = json.loads(line)
            turns = meeting["meeting_transcripts"]
            for q in meeting["specific_query_list"]:
                spans = tuple((int(a), int(b)) for a, b in q["relevant_text_span"])
                if (n, spans) in seen:
                    continue
                seen.add((n, spans))
                utts = [
                    {"speaker": t["speaker"], "text": t["content"]}
                    for a, b in spans
                    for t in turns[a : b + 1]
                    if t["content"].strip()
                ]
                words = sum(len(u["text"].split()) for u in utts)
                if min_words <= words <= max_words:
                    key = f"{name}-{n}-" + "-".join(f"{a}_{b}" for a, b in spans)
                    yield key, utts, q["query"]


RUN = 8  # words in a row that make a copy (recap_policy::copying::RUN)


def words(text):
    """Lower-case words as recap's copy rate splits them.

    >>> words("Don't ship it, Ann!")
    ["don't", 'ship', 'it', 'ann']
    """
    return [w.lower() for w in re.findall(r"(?:[^\W_]|')+", text)]


def runs(transcript):
    """Every run of RUN words of the transcript."""
    w = words(transcript)
    return {tuple(w[i : i + RUN]) for i in range(len(w) - RUN + 1)}


def copies(line, source_runs):
    """Whether the line holds RUN words of the transcript in a row.

    >>> src = runs("Ann: we will move the launch to the second week of March")
    >>> copies("- Move the launch to the second week of March.", src)
    True
    >>> copies("- Launch moves to mid-March.", src)
    False
    """
    w = words(line)
    return any(tuple(w[i : i + RUN]) in source_runs for i in range(len(w) - RUN + 1))


def clean(kind, text, source_runs=frozenset()):
    r"""The teacher's text with its "nothing here" lines settled and, in a
    list, the lines that copy the transcript left out ("" when only such
    lines were there).

    >>> clean("action_items", "- - Ann: No action items.\n- Bo: No action items.")
    'No action items.'
    >>> clean("decisions", "- Ship on Friday.\n- No decisions.")
    '- Ship on Friday.'
    >>> clean("overview", "  Ann opened. ")
    'Ann opened.'
    >>> src = runs("Bo: I will send the budget numbers to finance by Thursday")
    >>> clean("action_items", "- Bo: I will send the budget numbers to finance by Thursday.\n- Ann: book a room.", src)
    '- Ann: book a room.'
    >>> clean("action_items", "- I will send the budget numbers to finance by Thursday.", src)
    ''
    """
    text = text.strip()
    if kind not in NONE_ANSWER:
        return text
    none = NONE_ANSWER[kind]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    items = [l for l in lines if none.rstrip(".").lower() not in l.lower()]
    kept = [l for l in items if not copies(l, source_runs)]
    if items and not kept:
        return ""
    return "\n".join(kept) if kept else none


def unfit(kind, text, copy_rate):
    r"""Why a (cleaned) output is unfit as a target, or None when it is fit.

    >>> unfit("decisions", "- Ship on Friday.", 0.0) is None
    True
    >>> unfit("decisions", "- Ship.\n- - Ann: yes", 0.0)
    'not a - list'
    >>> unfit("action_items", "Ann will ship it.", 0.0)
    'not a - list'
    >>> unfit("overview", "Ann said we ship.", 0.5)
    'copies the transcript'
    >>> unfit("short", " ".join(["word"] * 41), 0.0)
    'short over 40 words'
    """
    if not text:
        return "empty"
    if copy_rate > 0.25:
        return "copies the transcript"
    if kind in NONE_ANSWER and text != NONE_ANSWER[kind]:
        if not all(l.startswith("- ") and not l.startswith("- -") for l in text.splitlines()):
            return "not a - list"
    if kind == "short" and len(text.split()) > 40:
        return "short over 40 words"
    return None


def admit_none(lists, share):
    """Whether one more "No ..." target keeps them within share of the list
    targets (counts in lists: "none" and "all" written so far).

    >>> admit_none({"none": 0, "all": 0}, 0.2)
    False
    >>> admit_none({"none": 0, "all": 4}, 0.2)
    True
    >>> admit_none({"none": 1, "all": 5}, 0.2)
    False
    >>> admit_none({"none": 9, "all": 9}, 1.0)
    True
    """
    return lists["none"] + 1 <= share * (lists["all"] + 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recap", default="target/debug/recap")
    p.add_argument("--config", default="config/recap.toml")
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct-q4_k_m")
    p.add_argument("--qmsum", required=True, help="QMSum train split (never val or test)")
    p.add_argument("--excerpts", type=int, default=48,
                   help="the seeded pool's first N excerpts (those --skip or --out hold count too)")
    p.add_argument("--min-words", type=int, default=200)
    p.add_argument("--max-words", type=int, default=450)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefer", help="regex: excerpts whose QMSum query matches it come first "
                   "(e.g. 'decid|agree|action|next step': where a meeting decides or assigns)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="the kinds to write, comma-separated (default: all four)")
    p.add_argument("--max-none-share", type=float, default=0.2,
                   help='largest share of "No ..." answers among list targets')
    p.add_argument("--skip", action="append", default=[],
                   help="a JSONL this script wrote before: its excerpts are passed over (repeatable)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if "val" in args.qmsum or "test" in args.qmsum:
        sys.exit(f"{args.qmsum}: distil from the train split only")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        sys.exit(f"--kinds {args.kinds}: each must be one of {', '.join(KINDS)}")

    pool = list(excerpts(args.qmsum, args.min_words, args.max_words))
    random.Random(args.seed).shuffle(pool)
    if args.prefer:
        # Stable: the preferred excerpts first, each group in seeded order.
        wanted = re.compile(args.prefer, re.I)
        pool.sort(key=lambda e: not wanted.search(e[2]))
    chosen = [(key, utts) for key, utts, _ in pool[: args.excerpts]]
    done = set()
    for path in args.skip:
        with open(path) as f:
            done.update(json.loads(l)["id"].rsplit(":", 1)[0] for l in f if l.strip())
    lists = {"none": 0, "all": 0}
    try:
        with open(args.out) as f:
            for l in f:
                if l.strip():
                    line = json.loads(l)
                    done.add(line["id"].rsplit(":", 1)[0])
                    if line["kind"] in NONE_ANSWER:
                        lists["all"] += 1
                        lists["none"] += line["target"] == NONE_ANSWER[line["kind"]]
    except FileNotFoundError:
        pass
    dropped = {}
    written = 0
    with open(args.out, "a") as out:
        for i, (key, utts) in enumerate(chosen):
            if key in done:
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".json") as job:
                # A QMSum-shaped meeting: summarize reads its turns as they are.
                json.dump({"meeting_transcripts": [{"speaker": u["speaker"], "content": u["text"]} for u in utts]}, job)
                job.flush()
                run = subprocess.run(
                    [args.recap, "--config", args.config, "summarize", job.name, "--model", args.teacher,
                     "--kinds", ",".join(kinds), "--json"],
                    capture_output=True, text=True,
                )
            if run.returncode != 0:
                sys.exit(f"{key}: recap summarize failed:\n{run.stderr}")
            source = runs("\n".join(f"{u['speaker']}: {u['text']}" for u in utts))
            for s in json.loads(run.stdout)["summaries"]:
                text = clean(s["kind"], s["text"], source)
                # A list's copying lines are gone after clean(), so what is
                # left copies nothing; recap's rate is of the uncleaned text.
                rate = 0.0 if s["kind"] in NONE_ANSWER else s["copy_rate"]
                why = unfit(s["kind"], text, rate)
                if not text and s["text"].strip():
                    why = "every line copies the transcript"
                if not why and text == NONE_ANSWER.get(s["kind"]):
                    if not admit_none(lists, args.max_none_share):
                        why = "no items, over --max-none-share"
                    else:
                        lists["none"] += 1
                if why:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                if s["kind"] in NONE_ANSWER:
                    lists["all"] += 1
                line = {"id": f"{key}:{s['kind']}", "transcript": utts, "kind": s["kind"],
                        "target": text}
                out.write(json.dumps(line) + "\n")
                written += 1
            out.flush()
            print(f"{i + 1}/{len(chosen)} {key}", file=sys.stderr)
    print(json.dumps({"excerpts": len(chosen), "pool": len(pool), "written": written, "dropped": dropped}))


if __name__ == "__main__":
    main()
