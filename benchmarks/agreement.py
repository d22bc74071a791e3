"""Drafters' teacher-forced top-1 agreement with SmolLM2-135M on the default distillation's cached teacher data:
its held-out part and a sample of its first training block (which every drafter distilled with the default seed,
--seq-len 256 and the same --draw trained on). Labels the teacher data first if it is not cached (about 35 minutes
on 2 cores). --draw file scores them on the teacher data of `triforce distill --draw file` instead (drafters made
before --draw existed drew that way).

    python benchmarks/agreement.py [TAG] [--drafter NAME=PATH ...] [--draw length|file]
writes benchmarks/results/agreement-TAG.{json,md} (TAG defaults to cpu; --drafter defaults to the shipped one).
"""
import argparse
import json
import os

from drivers import agreement_markdown, named_drafters, run_agreement
from triforce_rt.distill import DistillConfig
from triforce_rt.distill.corpus import DRAWS

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    ap.add_argument("--drafter", nargs="+", metavar="NAME=PATH", help="drafters to compare (default: the shipped one)")
    ap.add_argument("--draw", choices=DRAWS, default=DistillConfig.draw,
                    help="the distillation's --draw whose data scores them")
    args = ap.parse_args()
    drafters = named_drafters(args.drafter)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"agreement-{args.tag}.json")
    report = run_agreement(drafters, cfg=DistillConfig(draw=args.draw), out=path)
    argv = (([args.tag] if args.tag != "cpu" else []) + (["--drafter", *args.drafter] if args.drafter else [])
            + (["--draw", args.draw] if args.draw != DistillConfig.draw else []))
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"Command: `{' '.join(['python', 'benchmarks/agreement.py'] + argv)}`\n\n{agreement_markdown(report)}\n")
    print(json.dumps({"written": path}))
