"""Batched decoding (issue #7): B sequences decoded together against the same B prompts one at a time, for ar,
self-spec, streaming-spec and triforce (the shipped drafter), on SmolLM2-135M fp32, 2 threads, 64 greedy tokens.

    python benchmarks/batch.py [TAG] [--batch 4] [--contexts 4096 8064] [--prompt summarize|explain] [--refresh N]
writes benchmarks/results/batch-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
"""
import argparse
import json
import os

from drivers import PROMPTS, batch_markdown, run_batch
from triforce_rt.engine import GenerationConfig
from triforce_rt.models.loader import default_drafter

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8064])
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="summarize")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refresh", type=int, default=GenerationConfig.refresh, help="retrieval refresh")
    args = ap.parse_args()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"batch-{args.tag}.json")
    report = run_batch("default", tuple(args.contexts), args.batch, args.new_tokens, 2, drafter=default_drafter(),
                       prompt=args.prompt, out=path, refresh=args.refresh)
    argv = (([args.tag] if args.tag != "cpu" else []) + (["--batch", str(args.batch)] if args.batch != 4 else [])
            + (["--contexts", *map(str, args.contexts)] if args.contexts != [4096, 8064] else [])
            + (["--prompt", args.prompt] if args.prompt != "summarize" else [])
            + (["--new-tokens", str(args.new_tokens)] if args.new_tokens != 64 else [])
            + (["--refresh", str(args.refresh)] if args.refresh != GenerationConfig.refresh else []))
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"Command: `{' '.join(['python', 'benchmarks/batch.py'] + argv)}`\n\n{batch_markdown(report)}\n")
    print(json.dumps({"written": path}))
