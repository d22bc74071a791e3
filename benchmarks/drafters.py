"""Drafters side by side: draft and triforce with each drafter against AR, on SmolLM2-135M fp32, 2 threads, 128
greedy tokens, default settings, at 2K and 8K, on the held-out documents of refresh.py (--docs per prompt).
The drafter tier's α and cost per call are issue #4's two targets: α against tier 2 >= 0.6, and a
cost <= 10% of an AR step.

    python benchmarks/drafters.py [TAG] [--drafter NAME=PATH ...] [--docs 3] [--contexts 2048 8064]
writes benchmarks/results/drafters-TAG.{json,md} (TAG defaults to cpu; --drafter defaults to the shipped one,
default=triforce_rt/drafters/smollm2-135m-instruct). One run, ratios within it.
"""
import argparse

from drivers import drafters_markdown, named_drafters, result_path, run_drafters, script_args, write_markdown

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--drafter", nargs="+", metavar="NAME=PATH", help="drafters to compare (default: the shipped one)")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    args = ap.parse_args()
    drafters = named_drafters(args.drafter)
    path = result_path("drafters", args.tag)
    report = run_drafters(drafters, "default", tuple(args.contexts), args.docs, out=path)
    write_markdown(path, ap, args, "drafters", drafters_markdown(report))
