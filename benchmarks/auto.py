"""Issue #31: every mode, `--mode auto`, with and without the quantized drafting tier, on held-out code ("explain"
over stdlib sources) and prose ("summarize" over the Python docs) at 1K, 2K, 4K and 8K tokens, 128 new tokens,
greedy and sampled (T = 0.6; SEEDS seeds per row, since each mode samples another text and the lookup's
acceptance varies most with the text); then `make demo`'s own document (the Apache-2.0 text, summarize's chat request,
128 greedy tokens past any end of text) in ar, triforce, ngram and auto. One run per row, one prefill per prompt
and context.

    python benchmarks/auto.py [TAG] [--kernels auto|torch] [--quant q4|q8] [--contexts N ...] [--no-sampled]

writes benchmarks/results/auto-TAG.{json,md} (TAG defaults to cpu). `--mode auto` calibrates its step costs once
per context bucket (cached in $TRIFORCE_CACHE/calibration.json; the time is counted in the prefill, not the decode).
"""
import argparse
import json

import torch

from drivers import (PROMPTS, chat_prompt, heldout_ids, machine, mode_row, one_prefill, publish, result_path,
                     script_args, tiers_text, write_markdown)
from triforce_rt.distill.corpus import path as corpus_path
from triforce_rt.engine import GenerationConfig, generate
from triforce_rt.jobs.summarize import INSTRUCTION, request
from triforce_rt.models import load_model
from triforce_rt.models.loader import default_drafter, load_drafter
from triforce_rt.settings import HEAD_MODES, MODES
from triforce_rt.textio import read_text

FIXED = [m for m in MODES if m not in ("ar", "auto", *HEAD_MODES)]  # the head's modes: drafters.py cpu-head
SEEDS = (0, 1, 2)  # of each sampled row
SAMPLED = ("ngram", "self-spec", "self-spec-ngram", "triforce", "auto", "self-spec {q}", "auto {q}")


def variants(quant: str, greedy: bool) -> list:
    """(label, settings): every fixed mode, auto, and the self-drafting modes and auto on the quantized copy
    (sampled: the modes of SAMPLED, each over SEEDS)."""
    rows = [(m, {"mode": m}) for m in FIXED] + [("auto", {"mode": "auto"})]
    rows += [(f"{m} {quant}", {"mode": m, "draft_quant": quant}) for m in ("self-spec", "triforce", "auto")]
    return rows if greedy else [r for r in rows if r[0] in {v.format(q=quant) for v in SAMPLED}]


def row(label, res, ar, n_ctx, prompt, temperature, seed=0) -> dict:
    r = mode_row(n_ctx, res, ar, 0)
    del r["kv_bytes"]
    r.update(label=label, prompt=prompt, temperature=temperature, seed=seed,
             plan=[(e["mode"], e.get("gamma2")) for e in res.plan])
    if temperature:  # sampled: the tokens differ from ar's by chance, not by error
        del r["tokens_identical"]
    return r


def run(contexts, prompts, temperatures, quant: str, kernels: str, threads=2, out=None) -> dict:
    torch.set_num_threads(threads)
    model = load_model("default", kernels=kernels)
    drafter = load_drafter(default_drafter(), model)
    generate(model, list(range(1, 65)), GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    report = {"benchmark": "auto", "model": "default", "kernels": model.runtime.kernels, "quant": quant,
              "weights_bytes": model.weight_bytes(), "new_tokens": 128, "machine": machine(), "rows": [], "demo": []}
    for prompt in prompts:
        instruction, source = PROMPTS[prompt]
        text = heldout_ids(model.tokenizer, max(contexts), source)
        for n_ctx in contexts:
            decode = one_prefill(model, chat_prompt(model.tokenizer, instruction, text, n_ctx), 128)[0]
            for t in temperatures:
                for seed in SEEDS if t else (0,):
                    ar = decode(mode="ar", temperature=t, seed=seed)
                    report["rows"].append(row("ar", ar, ar, n_ctx, prompt, t, seed))
                    for label, settings in variants(quant, greedy=not t):
                        res = decode(drafter, temperature=t, seed=seed, **settings)
                        report["rows"].append(row(label, res, ar, n_ctx, prompt, t, seed))
            del decode
    ids = request(model.tokenizer, INSTRUCTION, read_text(corpus_path("licenses/Apache-2.0")))
    decode = one_prefill(model, ids, 128)[0]
    ar = decode(mode="ar")
    for mode in ("ar", "triforce", "ngram", "auto"):
        report["demo"].append(row(mode, decode(drafter, mode=mode), ar, len(ids), "demo", 0.0))
    publish(report, markdown, out)
    return report


def markdown(report: dict) -> str:
    m, rows = report["machine"], report["rows"]
    q = report["quant"]
    lines = [f"`--mode auto` and the quantized drafting tier ({q}), {report['model']} on {report['kernels']} kernels "
             f"(weights {report['weights_bytes'] / 1e6:.0f} MB), {report['new_tokens']} new tokens, {m['cpu']}, "
             f"{m['threads']} threads, torch {m['torch']}. One run per row; every ratio is against `ar` on the same "
             f"prefill, temperature and seed. Sampled rows (T = 0.6): the mean ratio over seeds {list(SEEDS)} "
             "(each mode samples its own text, and how often the lookup matches varies most with it).", "",
             "### Summary: per prompt, context and temperature", "",
             "| prompt | context | T | ar tok/s | best fixed mode | its × ar | auto × ar | auto / best "
             f"| auto plan (seed 0) | self-spec α | self-spec {q} α | auto {q} × ar |", "|---" * 12 + "|"]
    groups = dict.fromkeys((r["prompt"], r["context"], r["temperature"]) for r in rows)
    for key in groups:
        runs = {}  # label -> its rows (one per seed)
        for r in rows:
            if (r["prompt"], r["context"], r["temperature"]) == key:
                runs.setdefault(r["label"], []).append(r)
        mean = lambda label, f: round(sum(f(r) for r in runs[label]) / len(runs[label]), 2)
        ratio = lambda label: mean(label, lambda r: r["vs_ar"])
        alpha = lambda label: mean(label, lambda r: next(t["alpha"] for t in r["tiers"] if t["name"] == "retrieval"))
        best = max((label for label in runs if label not in ("ar", "auto", f"auto {q}")), key=ratio)
        plan = " → ".join(f"{p}" + (f" γ{gm}" if gm else "") for p, gm in runs["auto"][0]["plan"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mean('ar', lambda r: r['tok_s'])} | {best} "
                     f"| {ratio(best)}x | {ratio('auto')}x | {ratio('auto') / ratio(best):.2f} | {plan} "
                     f"| {alpha('self-spec')} | {alpha(f'self-spec {q}')} | {ratio(f'auto {q}')}x |")
    lines += ["", "### `make demo`'s document (summarize, greedy)", "",
              "| mode | tok/s | × ar | identical | plan |", "|---|---|---|---|---|"]
    for r in report["demo"]:
        lines.append(f"| {r['label']} | {r['tok_s']} | {r['vs_ar']}x | {r['tokens_identical']} "
                     f"| {' → '.join(p for p, _ in r['plan'])} |")
    lines += ["", "### Every row", "", "| prompt | context | T | seed | mode | tok/s | × ar | identical "
              "| tok/target call | tiers: accepted/drafted, α, ms/call |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['context']} | {r['temperature']} | {r['seed']} | {r['label']} "
                     f"| {r['tok_s']} | {r['vs_ar']}x | {r.get('tokens_identical', '-')} "
                     f"| {r['tokens_per_target_call']} | {tiers_text(r['tiers'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--kernels", default="auto", choices=("auto", "torch"))
    ap.add_argument("--quant", default="q4", choices=("q4", "q8"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8064])
    ap.add_argument("--prompts", nargs="+", default=sorted(PROMPTS))
    ap.add_argument("--no-sampled", action="store_true", help="greedy rows only")
    args = ap.parse_args()
    path = result_path("auto", args.tag)
    report = run(args.contexts, args.prompts, (0.0,) if args.no_sampled else (0.0, 0.6), args.quant, args.kernels,
                 out=path)
    write_markdown(path, ap, args, "auto", markdown(report))
    print(json.dumps({"rows": len(report["rows"])}))
