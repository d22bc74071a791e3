"""Every speculative mode against AR on SmolLM2-135M fp32, 2 threads, 2K and 8K real-text prompts, 128 greedy
tokens; then the retrieval tier's acceptance against budget (256..2048) and refresh at 8K.

    python benchmarks/hierarchy.py [TAG] [--drafter PATH] [--draft-dtype bfloat16]
writes benchmarks/results/hierarchy-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
"""
import argparse
import json
import os

from triforce_rt.bench import hierarchy_markdown, run_hierarchy

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    ap.add_argument("--drafter")
    ap.add_argument("--draft-dtype")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    args = ap.parse_args()
    modes = ("self-spec", "streaming-spec") + (("triforce", "draft") if args.drafter else ())
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"hierarchy-{args.tag}.json")
    report = run_hierarchy("default", tuple(args.contexts), 128, 2, modes, args.drafter, args.draft_dtype, out=path)
    argv = (([args.tag] if args.tag != "cpu" else []) + (["--drafter", args.drafter] if args.drafter else [])
            + (["--draft-dtype", args.draft_dtype] if args.draft_dtype else []))
    cmd = " ".join(["python", "benchmarks/hierarchy.py"] + argv)
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"Command: `{cmd}`\n\n{hierarchy_markdown(report)}\n")
    print(json.dumps({"written": path}))
