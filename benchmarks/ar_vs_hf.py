"""Our AR decode against HF transformers generate, SmolLM2-135M fp32, 2 threads, 2K and 8K real-text prompts.

    python benchmarks/ar_vs_hf.py [TAG]      # writes benchmarks/results/ar_vs_hf-TAG.{json,md} (TAG: cpu)
Same as `triforce bench --out FILE`. Results from one run only: these machines are shared and noisy.
"""
import argparse
import json
import os

from triforce_rt.measure import markdown, run_ar_vs_hf

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="our AR decode against HF transformers generate at 2K and 8K")
    ap.add_argument("tag", nargs="?", default="cpu", help="results go to benchmarks/results/ar_vs_hf-TAG.{json,md}")
    tag = ap.parse_args().tag
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(here, f"ar_vs_hf-{tag}.json")
    run_ar_vs_hf("default", (2048, 8064), 64, 2, path)
    with open(path) as f:
        report = json.load(f)
    cmd = "python benchmarks/ar_vs_hf.py" + (f" {tag}" if tag != "cpu" else "")
    with open(path[:-5] + ".md", "w") as f:
        f.write(f"Command: `{cmd}`\n\n{markdown(report)}\n")
