"""Batched decoding (issue #7): B sequences decoded together against the same B prompts one at a time, for ar,
self-spec, streaming-spec and triforce (the shipped drafter), on SmolLM2-135M fp32, 2 threads, 64 greedy tokens.

    python benchmarks/batch.py [TAG] [--batch 4] [--contexts 4096 8064] [--prompt summarize|explain] [--refresh N]
writes benchmarks/results/batch-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
"""
import argparse

from drivers import PROMPTS, batch_markdown, result_path, run_batch, script_args, write_markdown
from triforce_rt.engine import GenerationConfig
from triforce_rt.models.loader import default_drafter

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8064])
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="summarize")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refresh", type=int, default=GenerationConfig.refresh, help="retrieval refresh")
    args = ap.parse_args()
    path = result_path("batch", args.tag)
    report = run_batch("default", tuple(args.contexts), args.batch, args.new_tokens, 2, drafter=default_drafter(),
                       prompt=args.prompt, out=path, refresh=args.refresh)
    write_markdown(path, ap, args, "batch", batch_markdown(report))
