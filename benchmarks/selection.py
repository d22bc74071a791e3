"""Cost of one retrieval selection (RetrievalCache.select) on SmolLM2-135M's real 8K-token cache, fp32, 2 threads:
a selection that averages every key chunk (a cache's first one; every refresh did this before the means of
committed chunks were kept) against a refresh 8 tokens later, which averages only the chunks from the last
selection's length on. Median of 9 each.

    python benchmarks/selection.py [TAG] [--context 8064] [--budgets 256 1024 2048]
writes benchmarks/results/selection-TAG.md (TAG defaults to cpu). One run, ratios within it.
"""
import argparse
import os
import statistics
import time

import torch

from retrieval_cache import RetrievalCache
from drivers import PROMPTS, heldout_ids, session
from triforce_rt.measure import chat_prompt, machine
from triforce_rt.models.loader import load_model


def ms(fn) -> float:
    times = []
    for i in range(9):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    ap.add_argument("--context", type=int, default=8064)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024, 2048])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model("default", dtype=torch.float32)
    instruction, source = PROMPTS["explain"]
    ids = chat_prompt(model.tokenizer, instruction, heldout_ids(model.tokenizer, args.context, source), args.context)
    full = session(model, [ids], 128).full
    L, c = len(ids) - 9 * 8, 8
    rows = []
    for budget in args.budgets:
        rc = model.new_cache(RetrievalCache, budget, c, 64)
        rc.select(full, [L])

        def every_key(i):  # forget the kept means: average every chunk again, as a first selection does
            rc.final = 0
            rc.select(full, [L])

        first = ms(every_key)
        rc.select(full, [L - 8])
        refresh = ms(lambda i: rc.select(full, [L + 8 * i]))
        rows.append(f"| {budget} | {first:.1f} | {refresh:.1f} | {first / refresh:.1f}x |")
    m = machine()
    cmd = " ".join(["python", "benchmarks/selection.py"] + ([args.tag] if args.tag != "cpu" else [])
                   + (["--context", str(args.context)] if args.context != 8064 else [])
                   + (["--budgets", *map(str, args.budgets)] if args.budgets != [256, 1024, 2048] else []))
    text = "\n".join([f"Command: `{cmd}`", "",
                      f"RetrievalCache.select on SmolLM2-135M's cache of a {len(ids)}-token prompt (explain, held-out "
                      f"stdlib), chunk {c}, fp32, {m['cpu']}, {m['threads']} threads, torch {m['torch']}; median of 9.",
                      "", "| budget | selection reading every key, ms | refresh 8 tokens later, ms | ratio |",
                      "|---|---|---|---|", *rows])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"selection-{args.tag}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
