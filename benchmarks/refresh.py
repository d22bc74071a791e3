"""Retrieval refresh across documents: self-spec, triforce and triforce-ngram (the shipped drafter) at each
--refreshes value (default 0, select once after prefill as TriForce does, and 1, after every round) against AR,
on SmolLM2-135M fp32, 2 threads, 128 greedy tokens, default budget, at 2K and 8K, on --docs held-out documents
for each prompt (explain: stdlib code; summarize: the Python docs, from the shipped corpus).

    python benchmarks/refresh.py [TAG] [--docs 3] [--contexts 2048 8064] [--refreshes 0 1]
writes benchmarks/results/refresh-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
"""
import argparse
import json
import os

from drivers import refresh_markdown, run_refresh
from triforce_rt.models.loader import default_drafter

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    ap.add_argument("--refreshes", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"refresh-{args.tag}.json")
    report = run_refresh("default", tuple(args.contexts), args.docs, refreshes=tuple(args.refreshes),
                         drafter=default_drafter(), out=path)
    argv = (([args.tag] if args.tag != "cpu" else []) + (["--docs", str(args.docs)] if args.docs != 3 else [])
            + (["--contexts", *map(str, args.contexts)] if args.contexts != [2048, 8064] else [])
            + (["--refreshes", *map(str, args.refreshes)] if args.refreshes != [0, 1] else []))
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"Command: `{' '.join(['python', 'benchmarks/refresh.py'] + argv)}`\n\n{refresh_markdown(report)}\n")
    print(json.dumps({"written": path}))
