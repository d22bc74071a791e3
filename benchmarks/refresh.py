"""Retrieval refresh across documents: self-spec, triforce and triforce-ngram (the shipped drafter) at each
--refreshes value (default 0, select once after prefill as TriForce does, and 1, after every round) against AR,
on SmolLM2-135M fp32, 2 threads, 128 greedy tokens, default budget, at 2K and 8K, on --docs held-out documents
for each prompt (explain: stdlib code; summarize: the Python docs, from the shipped corpus).

    python benchmarks/refresh.py [TAG] [--docs 3] [--contexts 2048 8064] [--refreshes 0 1]
writes benchmarks/results/refresh-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
"""
import argparse

from drivers import refresh_markdown, result_path, run_refresh, script_args, write_markdown
from triforce_rt.models.loader import default_drafter

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    ap.add_argument("--refreshes", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    path = result_path("refresh", args.tag)
    report = run_refresh("default", tuple(args.contexts), args.docs, refreshes=tuple(args.refreshes),
                         drafter=default_drafter(), out=path)
    write_markdown(path, ap, args, "refresh", refresh_markdown(report))
