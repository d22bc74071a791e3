"""Drafters' teacher-forced top-1 agreement with SmolLM2-135M on the default distillation's cached teacher data:
its held-out part and a sample of its first training block (which every drafter distilled with the default seed,
--seq-len 256 and the same --draw trained on). Labels the teacher data first if it is not cached (about 35 minutes
on 2 cores). --draw file scores them on the teacher data of `triforce distill --draw file` instead (drafters made
before --draw existed drew that way).

    python benchmarks/agreement.py [TAG] [--drafter NAME=PATH ...] [--draw length|file]
writes benchmarks/results/agreement-TAG.{json,md} (TAG defaults to cpu; --drafter defaults to the shipped one).
"""
import argparse

from drivers import agreement_markdown, named_drafters, result_path, run_agreement, script_args, write_markdown
from triforce_rt.distill import DistillConfig
from triforce_rt.distill.corpus import DRAWS

if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--drafter", nargs="+", metavar="NAME=PATH", help="drafters to compare (default: the shipped one)")
    ap.add_argument("--draw", choices=DRAWS, default=DistillConfig.draw,
                    help="the distillation's --draw whose data scores them")
    args = ap.parse_args()
    drafters = named_drafters(args.drafter)
    path = result_path("agreement", args.tag)
    report = run_agreement(drafters, cfg=DistillConfig(draw=args.draw), out=path)
    write_markdown(path, ap, args, "agreement", agreement_markdown(report))
