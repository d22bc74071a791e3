"""The distillation corpus (triforce_rt/distill/corpus.py) in SmolLM2 tokens, and how much of it the teacher data
covers under each --draw rule: how many distinct corpus positions R slices of 256 tokens reach, and the share of
slices cut from long files (at least 8K tokens, like the 8K documents the hierarchy benchmarks decode).

The slices are simulated with the draw rule of corpus.Documents (a file, alike or in proportion to its tokens, among
the files of at least 256 tokens, then a uniform offset); every slice is drawn from the whole part here, while the
teacher draws half its answer prompts from code and half from prose.

    python benchmarks/corpus.py [TAG]
writes benchmarks/results/corpus-TAG.{json,md} (TAG defaults to cpu).
"""
import argparse
import json
import os
import platform
import sys

import numpy as np
from transformers import AutoTokenizer

from triforce_rt.distill.corpus import DRAWS, Documents

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "triforce_rt", "drafters", "smollm2-135m-instruct")
SLICE, LONG = 256, 8192
POSITIONS = (1_500_000, 3_000_000, 6_000_000, 30_000_000)


def coverage(tokens: np.ndarray, draw: str, positions: int, seed: int = 0) -> dict:
    """Distinct positions reached by positions // SLICE slices, and the share of slices from long files."""
    ok = np.flatnonzero(tokens >= SLICE)
    p = tokens[ok] / tokens[ok].sum() if draw == "length" else None
    rng = np.random.default_rng(seed)
    picks = rng.choice(ok, size=positions // SLICE, p=p)
    starts = rng.integers(0, tokens[picks] - SLICE + 1)
    covered = 0
    for f in np.unique(picks):  # the union of one file's slices [start, start + SLICE)
        mask = np.zeros(tokens[f], dtype=bool)
        for s in starts[picks == f]:
            mask[s : s + SLICE] = True
        covered += int(mask.sum())
    return {"draw": draw, "positions": positions, "distinct": covered, "long_share": float((tokens[picks] >= LONG).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tag", nargs="?", default="cpu")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    docs = Documents(tok, "train", seed=0, draw="length")
    part = docs.files
    tokens = np.array([len(docs.ids(s, p)) for s, p in part])
    sources = {}
    for (s, _), n in zip(part, tokens):
        row = sources.setdefault(s, {"files": 0, "tokens": 0, "long_files": 0, "long_tokens": 0})
        row["files"] += 1
        row["tokens"] += int(n)
        row["long_files"] += int(n >= LONG)
        row["long_tokens"] += int(n) * (n >= LONG)
    report = {"machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
              "sources": {s: {k: int(v) for k, v in r.items()} for s, r in sources.items()},
              "tokens": int(tokens.sum()),
              "coverage": [coverage(tokens, d, n) for n in POSITIONS for d in DRAWS]}
    path = os.path.join(HERE, "results", f"corpus-{args.tag}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"Command: `python benchmarks/corpus.py{'' if args.tag == 'cpu' else ' ' + args.tag}`", "",
             "Training part of the distillation corpus (the shipped corpus.tar.xz: Python 3.11.7's stdlib, the "
             "Python 3.11 docs, Debian's licenses), SmolLM2 tokens:", "",
             "| source | files | tokens | files of >= 8K tokens | their tokens |", "|---|---|---|---|---|"]
    for s, r in sources.items():
        lines.append(f"| {s} | {r['files']} | {r['tokens']:,} | {r['long_files']} | {r['long_tokens']:,} |")
    lines.append(f"| all | {len(part)} | {report['tokens']:,} | {int((tokens >= LONG).sum())} | "
                 f"{int(tokens[tokens >= LONG].sum()):,} |")
    lines += ["", "Teacher data of N positions as slices of 256 tokens (simulated draws, seed 0):", "",
              "| positions | --draw | distinct corpus positions | share of the corpus | slices from files >= 8K tokens |",
              "|---|---|---|---|---|"]
    for c in report["coverage"]:
        lines.append(f"| {c['positions'] / 1e6:g}M | {c['draw']} | {c['distinct'] / 1e6:.2f}M | "
                     f"{c['distinct'] / report['tokens']:.0%} | {c['long_share']:.0%} |")
    with open(path[:-5] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({"written": path}))


if __name__ == "__main__":
    main()
