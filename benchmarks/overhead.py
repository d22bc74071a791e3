"""The Python work around the forwards of a decode, per tier call, in two source trees measured one after the other
in one run (e.g. before and after a change to the decode loop):

    overhead per call = (decode seconds - seconds inside the tiers' forwards) / tier calls

on SmolLM2-135M fp32 with the shipped drafter, --mode draft (tier-1 steps dominate the calls), greedy, 2 threads,
at a held-out chat prompt of --context tokens. Each tree runs in its own process through the public API only
(load_model, generate), on the same prompt ids.

    python benchmarks/overhead.py --tree OLD_CHECKOUT --tree . [--context 8064] [--new-tokens 128] [--tag cpu]

writes benchmarks/results/overhead-TAG.{json,md}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CHILD = r"""
import json, sys, torch
from triforce_rt import load_model, generate, GenerationConfig
from triforce_rt.models.loader import default_drafter
torch.set_num_threads(2)
ids, new = json.load(open(sys.argv[1])), int(sys.argv[2])
model, drafter = load_model("default"), load_model(default_drafter())
cfg = GenerationConfig(mode="draft", max_new_tokens=new, ignore_eos=True)
generate(model, ids[:256], GenerationConfig(mode="draft", max_new_tokens=16, ignore_eos=True), drafter=drafter)
res = generate(model, ids, cfg, drafter=drafter)
calls = sum(t["calls"] for t in res.tiers)
inside = sum(t["seconds"] for t in res.tiers)
print(json.dumps({"decode_s": res.decode_seconds, "forward_s": inside, "calls": calls,
                  "overhead_us_per_call": 1e6 * (res.decode_seconds - inside) / calls,
                  "tier1_ms_per_call": 1e3 * res.tiers[0]["seconds"] / res.tiers[0]["calls"],
                  "tok_s": res.decode_tokens_per_second, "tokens": res.tokens}))
"""


def main():
    from transformers import AutoTokenizer

    from drivers import PROMPTS, heldout_ids
    from triforce_rt.measure import chat_prompt, machine
    from triforce_rt.models.loader import default_drafter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="a source checkout (repeat: measured in order)")
    ap.add_argument("--context", type=int, default=8064)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(default_drafter())  # the target's tokenizer files
    instruction, source = PROMPTS["explain"]
    ids = chat_prompt(tok, instruction, heldout_ids(tok, args.context, source), args.context)
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(ids, f)
        f.flush()
        for tree in args.tree:
            commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            run = subprocess.run([sys.executable, "-c", CHILD, f.name, str(args.new_tokens)], env=env,
                                 capture_output=True, text=True, cwd=os.path.abspath(tree))
            if run.returncode:
                sys.exit(f"{tree}: {run.stderr.strip()[-2000:]}")
            rows.append({"tree": tree, "commit": commit, **json.loads(run.stdout.strip().splitlines()[-1])})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), file=sys.stderr)
    report = {"benchmark": "overhead", "context": len(ids), "new_tokens": args.new_tokens, "mode": "draft",
              "machine": machine(), "rows": rows, "tokens_identical": all(r["tokens"] == rows[0]["tokens"] for r in rows)}
    path = os.path.join(HERE, "results", f"overhead-{args.tag}")
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"Command: `python benchmarks/overhead.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads. SmolLM2-135M fp32, "
             f"--mode draft, greedy, {len(ids)}-token prompt, {args.new_tokens} new tokens; one run, trees in order.",
             "", "| tree | commit | Python overhead per tier call | tier-1 step | tier calls | decode tok/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tree']} | {r['commit']} | {r['overhead_us_per_call']:.0f} µs | {r['tier1_ms_per_call']:.2f} ms "
              f"| {r['calls']} | {r['tok_s']:.2f} |" for r in rows]
    lines += ["", f"Tokens identical across trees: {report['tokens_identical']}."]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
