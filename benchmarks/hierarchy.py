"""Every speculative mode against AR on SmolLM2-135M fp32, 2 threads, 2K and 8K chat prompts about held-out text
(never seen by `triforce distill`), 128 greedy tokens; then the retrieval tier's acceptance against budget
(256..2048) and refresh at 8K (--no-sweep skips it).

    python benchmarks/hierarchy.py [TAG] [--drafter PATH|default] [--draft-dtype bfloat16] [--prompt summarize]
                                   [--refresh N]
writes benchmarks/results/hierarchy-TAG.{json,md} (TAG defaults to cpu). One run, ratios within it.
--prompt explain: "explain this code" over stdlib sources; summarize: "summarize" over the Python docs
(held-out files of the shipped corpus).
"""
import argparse

from drivers import PROMPTS, hierarchy_markdown, result_path, run_hierarchy, script_args, write_markdown
from triforce_rt.engine import GenerationConfig
from triforce_rt.models.loader import default_drafter

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--drafter")
    ap.add_argument("--draft-dtype")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="explain")
    ap.add_argument("--no-sweep", action="store_true", help="skip the budget x refresh sweep")
    ap.add_argument("--refresh", type=int, default=GenerationConfig.refresh,
                    help="retrieval refresh of the modes (the sweep sets its own)")
    args = ap.parse_args()
    drafter = default_drafter() if args.drafter == "default" else args.drafter
    modes = ("self-spec", "streaming-spec", "ngram") + (("draft", "triforce", "triforce-ngram") if drafter else ())
    path = result_path("hierarchy", args.tag)
    sweep = {"budgets": ()} if args.no_sweep else {}
    report = run_hierarchy("default", tuple(args.contexts), 128, 2, modes, drafter, args.draft_dtype, out=path,
                           prompt=args.prompt, refresh=args.refresh, **sweep)
    write_markdown(path, ap, args, "hierarchy", hierarchy_markdown(report))
