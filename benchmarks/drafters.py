"""Drafters side by side against AR, on SmolLM2-135M (fp32 compute, on the kernels --kernels auto picks: numba for
the default GGUF, and each drafter on its target's kernels), 2 threads, 128 greedy tokens, default settings, at 2K
and 8K, on the held-out documents of refresh.py (--docs per prompt): each tiny drafter in draft and triforce, each
recurrent head in its modes (redrafter, triforce-redrafter, redrafter-ngram) at each --head-cutoff of --cutoffs, at
each drafting γ of --gammas (0 = the mode's default) and, in redrafter, each beam width W of --beams (a tree of W
beams verified in one forward); with --quant, self-spec on a quantized copy of the target (the quantized tier) at
the same γ; with --baselines, modes that need no drafter model (ngram, auto), so that the best mode with the head
and the best without it are compared in one run. With a head on a numba target, one head step at 1-8 rows is also
timed on torch and on numba.
The drafter tier's α and cost per call are issue #4's two targets (α against tier 2 >= 0.6, a cost <= 10% of an AR
step) and the head's α issue #32's (>= 0.7 at 8K).

    python benchmarks/drafters.py [TAG] [--drafter NAME=PATH ...] [--docs 3] [--contexts 2048 8064] [--gammas 0]
        [--beams 1] [--cutoffs 0.2] [--quant q4] [--baselines ngram auto]
writes benchmarks/results/drafters-TAG.{json,md} (TAG defaults to cpu; --drafter defaults to the shipped drafter
and head: default=triforce_rt/drafters/smollm2-135m-instruct head=triforce_rt/drafters/smollm2-135m-instruct-head).
One run, ratios within it.
"""
import argparse

from drivers import drafters_markdown, named_drafters, result_path, run_drafters, script_args, write_markdown

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--drafter", nargs="+", metavar="NAME=PATH", help="drafters to compare (default: the shipped one)")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8064])
    ap.add_argument("--gammas", type=int, nargs="+", default=[0], help="the drafter's γ per verification (0: default)")
    ap.add_argument("--beams", type=int, nargs="+", default=[1], help="redrafter's beam widths W")
    ap.add_argument("--cutoffs", type=float, nargs="+", default=[None], help="the head's --head-cutoff values "
                    "(default: the setting's default)")
    ap.add_argument("--quant", nargs="*", default=[], help="also self-spec with a drafting copy in these formats "
                    "(q8, q4): the quantized tier")
    ap.add_argument("--baselines", nargs="*", default=[], help="also these modes without a drafter model, at default "
                    "settings (ngram, auto, ...)")
    args = ap.parse_args()
    drafters = named_drafters(args.drafter)
    path = result_path("drafters", args.tag)
    report = run_drafters(drafters, "default", tuple(args.contexts), args.docs, gammas=[g or None for g in args.gammas],
                          beams=args.beams, cutoffs=args.cutoffs, quants=args.quant, baselines=args.baselines, out=path)
    write_markdown(path, ap, args, "drafters", drafters_markdown(report))
