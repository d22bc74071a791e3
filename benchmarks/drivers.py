"""Benchmark drivers on real text, each measured in one run: every speculative mode against AR (run_hierarchy),
retrieval refresh across documents (run_refresh), drafters side by side (run_drafters) and their teacher-forced
agreement (run_agreement), and batched decoding against the same sequences one at a time (run_batch); with their
markdown renderers. The scripts beside this file call them; the package never imports them.
"""
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triforce_rt.distill import DistillConfig, block_records, teacher_data  # noqa: E402
from triforce_rt.distill.train import evaluate  # noqa: E402
from triforce_rt.engine import GenerationConfig, Session, generate, generate_batch  # noqa: E402
from triforce_rt.measure import chat_prompt, machine, publish  # noqa: E402
from triforce_rt.models import load_model  # noqa: E402
from triforce_rt.models.head import RecurrentHead  # noqa: E402
from triforce_rt.models.loader import default_drafter, load_drafter  # noqa: E402
from triforce_rt.settings import HEAD_MODES, MODES, gamma_name  # noqa: E402
from triforce_rt.textio import tier_stats  # noqa: E402


def run_hierarchy(spec="default", contexts=(2048, 8064), new_tokens=128, threads=2, modes=("self-spec", "streaming-spec"),
                  drafter=None, draft_dtype=None, budgets=(256, 512, 1024, 2048), refreshes=(0, 1, 8, 32), out=None,
                  prompt="explain", refresh=GenerationConfig.refresh) -> dict:
    """Every mode against ar on one prefill per context (greedy, fp32 target, the modes at `refresh`), then at the
    longest context the retrieval tier's acceptance against budget and refresh (skipped when budgets is empty).
    Tier times give each step's cost (cost model). prompt: a key of PROMPTS, about held-out text."""
    torch.set_num_threads(threads)
    model = load_model(spec, dtype=torch.float32)
    draft = load_drafter(drafter, model, dtype=torch.float32) if drafter else None
    instruction, source = PROMPTS[prompt]
    ids_all = heldout_ids(model.tokenizer, max(contexts), source)
    generate(model, ids_all[:64], GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    report = {"benchmark": "hierarchy", "prompt": f"{instruction!r} + held-out {source} text, chat template", "model": spec,
              "dtype": "float32", "draft_dtype": draft_dtype or "float32", "drafter": drafter, "refresh": refresh,
              "new_tokens": new_tokens, "machine": machine(), "modes": [], "sweep": [],
              "weights_bytes": model.weight_bytes(), "kernels": model.runtime.kernels}
    for n_ctx in contexts:
        ids = chat_prompt(model.tokenizer, instruction, ids_all, n_ctx)
        run, full = one_prefill(model, ids, new_tokens, draft_dtype=draft_dtype, refresh=refresh)
        ar = run(mode="ar")
        kv = 2 * full.k[:, :, :, :n_ctx].numel() * full.k.element_size()
        report["modes"].append(mode_row(n_ctx, ar, ar, kv))
        for mode in modes:
            report["modes"].append(mode_row(n_ctx, run(draft, mode=mode), ar, kv))
        if n_ctx == max(contexts):
            for budget in budgets:
                for refresh in refreshes:
                    res = run(mode="self-spec", budget=budget, refresh=refresh)
                    t = tier_stats(res.tiers[0])
                    row = {"context": n_ctx, "budget": budget, "refresh": refresh,
                           "acceptance": t["acceptance"], "alpha": t["alpha"],
                           "tokens_per_target_call": round(res.tokens_per_target_call, 2),
                           "tok_s": round(res.decode_tokens_per_second, 2),
                           "speedup": round(res.decode_tokens_per_second / ar.decode_tokens_per_second, 2)}
                    report["sweep"].append(row)
                    print(json.dumps(row), flush=True)
    publish(report, hierarchy_markdown, out)
    return report


def run_refresh(spec="default", contexts=(2048, 8064), docs=3, new_tokens=128, threads=2,
                modes=("self-spec", "triforce", "triforce-ngram"), refreshes=(0, 1), drafter=None,
                prompts=("explain", "summarize"), out=None) -> dict:
    """Each mode at each retrieval refresh against AR (greedy, fp32, default budget), on `docs` documents per
    prompt: document i is the held-out text from token i * max(contexts) on, cut to each context."""
    torch.set_num_threads(threads)
    model = load_model(spec, dtype=torch.float32)
    draft = load_drafter(drafter, model, dtype=torch.float32) if drafter else None
    generate(model, list(range(1, 65)), GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    report = {"benchmark": "refresh", "model": spec, "dtype": "float32", "drafter": drafter, "new_tokens": new_tokens,
              "machine": machine(), "rows": []}
    variants = [({"refresh": r}, draft, {"mode": m, "refresh": r}) for m in modes for r in refreshes]
    report["rows"] = document_rows(model, contexts, docs, prompts, new_tokens, variants)
    publish(report, refresh_markdown, out)
    return report


def refresh_markdown(report: dict) -> str:
    """Per context, mode and refresh: speed against AR over every document (geometric mean, min, max) and the
    retrieval tier's mean α; then every row."""
    m, rows = report["machine"], report["rows"]
    tier_alpha = lambda r, name: next((t["alpha"] for t in r["tiers"] if t["name"] == name), None)
    n_docs = len({(r["prompt"], r["doc"]) for r in rows})
    lines = [f"Retrieval refresh, {report['model']} {report['dtype']}, greedy, {report['new_tokens']} new tokens, "
             f"default budget, {n_docs} documents, {m['cpu']}, {m['threads']} threads, torch {m['torch']}. "
             "Refresh N re-selects the retrieval cache after every round that ends N or more tokens after the last "
             "selection (0: once, after prefill).", "",
             "| context | mode | refresh | vs ar: geo-mean | min | max | retrieval α (mean) | all identical |",
             "|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["context"], r["mode"], r["refresh"]) for r in rows):
        group = [r for r in rows if (r["context"], r["mode"], r["refresh"]) == key]
        ratios = [r["vs_ar"] for r in group]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        a = sum(tier_alpha(r, "retrieval") for r in group) / len(group)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {geo:.2f}x | {min(ratios)}x | {max(ratios)}x | {a:.2f} "
                     f"| {all(r['tokens_identical'] for r in group)} |")
    lines += ["", "| prompt | doc | context | mode | refresh | tok/s | vs ar | tiers: α, ms/call |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['doc']} | {r['context']} | {r['mode']} | {r['refresh']} | {r['tok_s']} "
                     f"| {r['vs_ar']}x | {tiers_text(r['tiers'])} |")
    return "\n".join(lines)


def named_drafters(specs: list | None) -> dict:
    """--drafter NAME=PATH ... as {NAME: PATH}; the shipped drafter as 'default' and the shipped recurrent head as
    'head' when none are given."""
    pairs = [s.split("=", 1) for s in specs or []]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit("error: --drafter takes NAME=PATH")
    return dict(pairs) or {"default": default_drafter(), "head": default_drafter(head=True)}


def run_drafters(drafters: dict, spec="default", contexts=(2048, 8064), docs=3, new_tokens=128, threads=2,
                 modes=("draft", "triforce"), prompts=("explain", "summarize"), gammas=(None,), beams=(1,),
                 cutoffs=(None,), quants=(), baselines=(), out=None) -> dict:
    """Drafters side by side ({label: path}: tiny drafters, in `modes`, or recurrent heads, in the head's modes at
    each --head-cutoff of cutoffs; redrafter at each beam width of beams), each mode at default settings but for the
    drafter's γ (gammas; None = the default) against AR, on the documents of run_refresh: the drafter tier's α
    (against the target alone, against tier 2 under it) and its cost. quants: self-spec rows with a drafting copy in
    each of these formats (the quantized tier, labelled 'self-spec-QUANT'), at the same γ. baselines: modes that
    draft without a drafter model (ngram, auto, ...), at default settings, labelled 'none'."""
    torch.set_num_threads(threads)
    model = load_model(spec, dtype=torch.float32)
    loaded = {name: load_drafter(path, model, dtype=torch.float32) for name, path in drafters.items()}
    generate(model, list(range(1, 65)), GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    report = {"benchmark": "drafters", "model": spec, "dtype": "float32", "kernels": model.runtime.kernels,
              "drafters": drafters, "new_tokens": new_tokens, "machine": machine(), "rows": []}
    variants = []
    for name, d in loaded.items():
        head = isinstance(d, RecurrentHead)
        for m in HEAD_MODES if head else modes:
            own = gamma_name(MODES[m].tiers, 0)  # the drafter is the bottom tier
            variants += [({"drafter": name, "gamma": g or "default", "beams": w,
                           **({"cutoff": "default" if c is None else c} if head else {})}, d,
                          {"mode": m, "beams": w, **({own: g} if g else {}),
                           **({"head_cutoff": c} if head and c is not None else {})})
                         for g in gammas for w in (beams if m == "redrafter" else (1,))
                         for c in (cutoffs if head else (None,))]
    variants += [({"drafter": f"self-spec-{q}", "gamma": g or "default", "beams": 1}, None,
                  {"mode": "self-spec", "draft_quant": q, **({"gamma2": g} if g else {})}) for q in quants for g in gammas]
    variants += [({"drafter": "none", "gamma": "default", "beams": 1}, None, {"mode": m}) for m in baselines]
    heads = {name: drafters[name] for name, d in loaded.items() if isinstance(d, RecurrentHead)}
    if heads and model.runtime.kernels != "torch":
        report["head_steps"] = head_steps(spec, model, heads)
    report["rows"] = document_rows(model, contexts, docs, prompts, new_tokens, variants)
    publish(report, drafters_markdown, out)
    return report


def head_steps(spec, model, heads: dict, rows=(1, 2, 4, 8), reps=300) -> list:
    """One greedy step of each recurrent head ({label: path}) at 1-8 rows (a beam search step's rows are its
    beams), on torch and on the kernels of model (spec, loaded; load_head: RecurrentHead.on_kernels_of): median ms
    of reps."""
    from triforce_rt.models.head import load_head

    torch_target = load_model(spec, dtype=torch.float32, kernels="torch")
    out = []
    for name, path in heads.items():
        for kernels, target in (("torch", torch_target), (model.runtime.kernels, model)):
            head = load_head(path, target)
            for n in rows:
                h, x = torch.randn(n, head.hidden, generator=torch.Generator().manual_seed(n)), torch.arange(n)
                times = []
                with torch.inference_mode():
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        s = head.step(target.embed_tokens(x).float(), None)
                        head.reduced_logits(s, h).argmax(-1)
                        times.append(time.perf_counter() - t0)
                out.append({"head": name, "kernels": kernels, "rows": n,
                            "ms": round(1e3 * statistics.median(times[reps // 10:]), 3)})
    return out


def drafters_markdown(report: dict) -> str:
    """Per context, mode, drafter and its γ: the drafter tier's α over the documents (median, min, max), its mean
    cost per call and its largest share of an AR step (AR step = 1000 / ar_tok_s ms), tokens per target call
    (mean) and speed against AR (geometric mean); then every row."""
    m, rows = report["machine"], report["rows"]
    n_docs = len({(r["prompt"], r["doc"]) for r in rows})
    tier = lambda r: r["tiers"][0]  # the drafter's (the bottom tier)
    lines = [f"Drafters, {report['model']} {report['dtype']}, {report.get('kernels', 'torch')} kernels (the drafters "
             f"on the target's), greedy, {report['new_tokens']} new tokens, default "
             f"settings, {n_docs} documents, {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Drafters: "
             + ", ".join(f"{k} = `{v}`" for k, v in report["drafters"].items()) + ". The drafter's α is against "
             "the tier it drafts for: the target in draft and redrafter, tier 2 (the target on its retrieval cache) "
             "in triforce and triforce-redrafter. γ: the drafter's tokens per verification (default: gamma2 = 6 "
             "alone, gamma1 = 4 under tier 2). W: beams (redrafter); a tree's α is the share of examined nodes the "
             "target descended into, and 'verified/call' its nodes per target call after deduplication (before: the "
             "beams' tokens). c: the head's --head-cutoff. A head's call is one step of its recurrence (a beam search "
             "step: all beams). Drafter 'none': a mode without a drafter model (its α: its bottom tier's).", "",
             "| context | mode | drafter | γ | W | c | drafter α: median | min | max | ms/drafter call | max share of "
             "an AR step | tok/target call | verified/call (before dedup) | vs ar: geo-mean | all identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key_of = lambda r: (r["context"], r["mode"], r["drafter"], r.get("gamma", "default"), r.get("beams", 1),  # noqa: E731
                        r.get("cutoff", ""))
    best = {}  # (context, uses the head) -> (geo-mean, key)
    for key in dict.fromkeys(map(key_of, rows)):
        group = [r for r in rows if key_of(r) == key]
        a = sorted(tier(r)["alpha"] for r in group if tier(r)["alpha"] is not None)  # none: the tier never drafted
        ms = sum(tier(r)["ms_per_call"] for r in group) / len(group)
        share = max(tier(r)["ms_per_call"] * r["ar_tok_s"] / 1000 for r in group)  # unrounded: vs_ar may round to 0
        per_call = sum(r["tokens_per_target_call"] for r in group) / len(group)
        geo = math.exp(sum(math.log(r["tok_s"] / r["ar_tok_s"]) for r in group) / len(group))
        trees = [r["tree"] for r in group if "tree" in r]
        verified = (f"{sum(t['nodes_per_call'] for t in trees) / len(trees):.1f} "
                    f"({sum(t['beam_tokens_per_call'] for t in trees) / len(trees):.1f})" if trees else "")
        alphas = f"{statistics.median(a):.2f} | {a[0]:.2f} | {a[-1]:.2f}" if a else "– | – | –"
        lines.append(f"| {' | '.join(map(str, key))} | {alphas} | {ms:.1f} | {100 * share:.0f}% | {per_call:.2f} "
                     f"| {verified} | {geo:.2f}x | {all(r['tokens_identical'] for r in group)} |")
        side = (key[0], tier(group[0])["name"] == "head")
        best[side] = max(best.get(side, (0.0, key)), (geo, key), key=lambda b: b[0])
    contexts = sorted({c for c, _ in best})
    if any((c, True) in best and (c, False) in best for c in contexts):
        lines += ["", "Best mode with the head against the best without it (geo-mean against ar, this run):", "",
                  "| context | best with the head | × ar | best without | × ar | with / without |",
                  "|---|---|---|---|---|---|"]
        label = lambda k: f"{k[1]} ({k[2]}, γ {k[3]}" + (f", W {k[4]}" if k[4] != 1 else "") + (  # noqa: E731
            f", c {k[5]})" if k[5] != "" else ")")
        for c in contexts:
            (gw, kw), (go, ko) = best[(c, True)], best[(c, False)]
            lines.append(f"| {c} | {label(kw)} | {gw:.2f}x | {label(ko)} | {go:.2f}x | {gw / go:.2f} |")
    if report.get("head_steps"):
        ar_ms = {c: 1000 / statistics.median(r["ar_tok_s"] for r in rows if r["context"] == c)
                 for c in sorted({r["context"] for r in rows})}
        lines += ["", "One head step (greedy: the recurrence, the reduced logits and their argmax) at 1-8 rows, on "
                  "torch (fp32) and on the target's kernels (numba: over Q8_0 blocks), median of 300 on a warm cache, "
                  "and its share of this run's median AR step at each context ("
                  + ", ".join(f"{c}: {ms:.1f} ms" for c, ms in ar_ms.items()) + "):", "",
                  "| head | kernels | rows | ms | " + " | ".join(f"share at {c}" for c in ar_ms) + " |",
                  "|---|---|---|---|" + "---|" * len(ar_ms)]
        lines += [f"| {r['head']} | {r['kernels']} | {r['rows']} | {r['ms']} | "
                  + " | ".join(f"{100 * r['ms'] / ms:.1f}%" for ms in ar_ms.values()) + " |"
                  for r in report["head_steps"]]
    lines += ["", "| prompt | doc | context | drafter | γ | W | c | mode | tok/s | vs ar | tiers: α, ms/call |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['doc']} | {r['context']} | {r['drafter']} | {r.get('gamma', 'default')} "
                     f"| {r.get('beams', 1)} | {r.get('cutoff', '')} | {r['mode']} | {r['tok_s']} | {r['vs_ar']}x "
                     f"| {tiers_text(r['tiers'])} |")
    return "\n".join(lines)


def run_agreement(drafters: dict, spec="default", threads=2, cfg=None, out=None) -> dict:
    """Teacher-forced top-1 agreement of drafters ({label: path}) with the target, on the cached teacher data of
    `triforce distill` with cfg (default: the default distillation's): its held-out part, and as many records spread
    evenly over its first training block, which every drafter distilled with that seed, --seq-len and --draw
    trained on. The gap between the two is what a drafter learnt of its training records rather than of the
    target."""
    torch.set_num_threads(threads)
    cfg = cfg or DistillConfig(target=spec)
    teacher = load_model(cfg.target, dtype="bfloat16")  # as distill loads it: the teacher cache is keyed by dtype
    train, held = teacher_data(teacher, cfg, progress=True)
    first = min(len(train["tokens"]), block_records(cfg))  # records of the first block
    pick = torch.linspace(0, first - 1, len(held["tokens"])).long()
    sample = {k: v[pick] for k, v in train.items()}
    report = {"benchmark": "agreement", "model": spec, "drafters": drafters, "records": len(pick),
              "seq_len": cfg.seq_len, "draw": cfg.draw, "machine": machine(), "rows": []}
    cpu = torch.device("cpu")
    for name, path in drafters.items():
        d = load_model(path, dtype=torch.float32)
        h, t = evaluate(d, held, cpu), evaluate(d, sample, cpu)
        report["rows"].append({"drafter": name, "parameters": sum(p.numel() for p in d.parameters()),
                               "heldout": round(h["agreement"], 4), "train_sample": round(t["agreement"], 4),
                               "coverage": round(h["vocab_coverage"], 4), "positions": h["positions"]})
    publish(report, agreement_markdown, out)
    return report


def agreement_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Teacher-forced top-1 agreement with {report['model']} (the distillation teacher's cached top-16), "
             f"records of {report['seq_len']} tokens, documents drawn with --draw {report['draw']}: the "
             f"held-out part ({report['rows'][0]['positions']} positions) and {report['records']} records spread over "
             f"the first training block. {m['cpu']}, {m['threads']} "
             f"threads, torch {m['torch']}. Drafters: " + ", ".join(f"{k} = `{v}`" for k, v in report["drafters"].items()),
             "", "| drafter | parameters | held-out | training sample | gap | held-out top-1 in the draft vocabulary |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['drafter']} | {r['parameters'] / 1e6:.1f}M | {100 * r['heldout']:.1f}% "
                     f"| {100 * r['train_sample']:.1f}% | {100 * (r['train_sample'] - r['heldout']):.1f} points "
                     f"| {100 * r['coverage']:.1f}% |")
    return "\n".join(lines)


def run_batch(spec="default", contexts=(4096, 8064), batch=4, new_tokens=64, threads=2,
              modes=("ar", "self-spec", "streaming-spec", "triforce"), drafter=None, prompt="summarize", out=None,
              refresh=GenerationConfig.refresh) -> dict:
    """Throughput of `batch` sequences decoded together against the same sequences one at a time, per mode, from
    one prefill each (greedy, fp32, ignore_eos). Throughput = all new tokens / decode seconds (the batch's, or
    the sum of the sequential runs'). Each context's prompts are chat requests about `batch` consecutive
    slices of held-out text."""
    torch.set_num_threads(threads)
    model = load_model(spec, dtype=torch.float32)
    draft = load_drafter(drafter, model, dtype=torch.float32) if drafter else None
    instruction, source = PROMPTS[prompt]
    generate_batch(model, [[1, 2, 3]] * 2, GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    report = {"benchmark": "batch", "prompt": f"{instruction!r} + held-out {source} text, chat template", "model": spec,
              "dtype": "float32", "drafter": drafter, "batch": batch, "new_tokens": new_tokens, "refresh": refresh,
              "machine": machine(), "rows": []}
    for n_ctx in contexts:
        doc = heldout_ids(model.tokenizer, batch * n_ctx, source)
        prompts = [chat_prompt(model.tokenizer, instruction, doc[i * n_ctx :], n_ctx) for i in range(batch)]
        cfg = lambda mode: GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, mode=mode, refresh=refresh)
        alone = {m: [] for m in modes}
        for ids in prompts:
            one = session(model, [ids], new_tokens)
            for m in modes:
                alone[m] += one.decode(cfg(m), drafter=draft)
            del one
        together_s = session(model, prompts, new_tokens)
        base = sum(r.new_tokens - 1 for r in alone["ar"]) / sum(r.decode_seconds for r in alone["ar"])
        for m in modes:
            together = together_s.decode(cfg(m), drafter=draft)
            seq_tps = sum(r.new_tokens - 1 for r in alone[m]) / sum(r.decode_seconds for r in alone[m])
            tps = sum(r.new_tokens - 1 for r in together) / max(r.decode_seconds for r in together)
            row = {"context": n_ctx, "mode": m, "sequential_tok_s": round(seq_tps, 2), "batched_tok_s": round(tps, 2),
                   "batched_vs_sequential": round(tps / seq_tps, 2), "batched_vs_sequential_ar": round(tps / base, 2),
                   "tokens_identical": [r.tokens for r in together] == [r.tokens for r in alone["ar"]],
                   "tiers": [tier_stats(t) for t in together[0].tiers]}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        del together_s
    publish(report, batch_markdown, out)
    return report


def tiers_text(tiers: list) -> str:
    """'name 0.85, α 0.93, 3.1 ms; ...' for a row's tiers (textio.tier_stats): accepted/drafted where the row has
    it, α, ms per call."""
    return "; ".join(f"{t['name']} " + (f"{t['acceptance']:.2f}, " if t.get("acceptance") is not None else "")
                     + (f"α {t['alpha']:.2f}, " if t["alpha"] is not None else "") + f"{t['ms_per_call']} ms"
                     for t in tiers)


def batch_markdown(report: dict) -> str:
    m, B = report["machine"], report["batch"]
    lines = [f"Batched decoding, {B} sequences, {report['model']} {report['dtype']}, greedy, {report['new_tokens']} new "
             f"tokens each, retrieval refresh {report['refresh']}, {m['cpu']}, {m['threads']} threads, "
             f"torch {m['torch']}. Throughput = new tokens of all {B} sequences / decode seconds; sequential = the "
             f"same {B} prompts one at a time.", "",
             "| context | mode | sequential tok/s | batched tok/s | batched vs sequential | vs sequential ar "
             "| identical to ar | batched tiers: α, ms/step |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {B}x{r['context']} | {r['mode']} | {r['sequential_tok_s']} | {r['batched_tok_s']} "
                     f"| {r['batched_vs_sequential']}x | {r['batched_vs_sequential_ar']}x | {r['tokens_identical']} "
                     f"| {tiers_text(r['tiers'])} |")
    return "\n".join(lines)


PROMPTS = {  # instruction, and the held-out corpus source (distill/corpus.py) of the document it is about
    "explain": ("Explain what the following Python code does, function by function.\n\n", "stdlib"),
    "summarize": ("Summarize the following document.\n\n", "docs"),
}


def heldout_ids(tokenizer, n: int, source: str) -> list:
    """n tokens of held-out corpus files of one source (never seen by `triforce distill`), in a fixed order."""
    from triforce_rt.distill.corpus import files, read

    ids = []
    for src, name in files("heldout"):
        if src == source:
            ids += tokenizer(read(src, name)).input_ids
            if len(ids) >= n:
                return ids[:n]
    raise RuntimeError(f"only {len(ids)} tokens of held-out {source} text in the corpus")


def session(model, prompts: list, new_tokens: int) -> Session:
    """One prefill of the prompts for every run a benchmark decodes from it: room for new_tokens and a verification
    block of up to 63 drafts, in 64-token chunks (every chunk size the benchmarks sweep divides 64)."""
    return Session(model, prompts, [GenerationConfig(max_new_tokens=new_tokens, mode="self-spec", chunk_size=64,
                                                     gamma2=63)])


def one_prefill(model, ids: list, new_tokens: int, **fixed):
    """run(drafter=None, **kw): a greedy, ignore_eos decode of new_tokens from one prefill of ids, with the
    settings `fixed` and kw over them; and the target's cache."""
    s = session(model, [ids], new_tokens)

    def run(drafter=None, **kw):
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, **{**fixed, **kw})
        return s.decode(cfg, drafter=drafter)[0]
    return run, s.full


def document_rows(model, contexts, docs: int, prompts, new_tokens: int, variants: list) -> list:
    """The rows of run_refresh and run_drafters: per prompt, document and context, one prefill, AR, then each
    variant (labels, drafter, GenerationConfig settings) as a mode_row under its labels. Document i of a prompt
    is the held-out text from token i * max(contexts) on, cut to each context inside the prompt's chat request."""
    rows, span = [], max(contexts)
    for prompt in prompts:
        instruction, source = PROMPTS[prompt]
        text = heldout_ids(model.tokenizer, docs * span, source)
        for doc in range(docs):
            for n_ctx in contexts:
                run = one_prefill(model, chat_prompt(model.tokenizer, instruction, text[doc * span :], n_ctx),
                                  new_tokens)[0]
                ar = run(mode="ar")
                for labels, drafter, settings in variants:
                    res = run(drafter, **settings)
                    row = mode_row(n_ctx, res, ar, 0)
                    del row["kv_bytes"]
                    if settings.get("beams", 1) > 1:  # a tree of beams: tokens verified per target call
                        calls = res.tiers[-1]["calls"]
                        row["tree"] = {"nodes_per_call": round(res.tiers[0]["drafted"] / calls, 2),
                                       "beam_tokens_per_call": round(res.tiers[0]["beam_tokens"] / calls, 2)}
                    rows.append({"prompt": prompt, "doc": doc, **labels, **row})
                del run  # this document's cache, before the next prefill
    return rows


def mode_row(n_ctx, res, ar, kv_bytes) -> dict:
    row = {"context": n_ctx, "mode": res.mode, "tok_s": round(res.decode_tokens_per_second, 2),
           "vs_ar": round(res.decode_tokens_per_second / ar.decode_tokens_per_second, 2),
           "ar_tok_s": round(ar.decode_tokens_per_second, 2),
           "tokens_identical": res.tokens == ar.tokens, "tokens_per_target_call": round(res.tokens_per_target_call, 2),
           "kv_bytes": kv_bytes,
           "tiers": [tier_stats(t) for t in res.tiers]}
    print(json.dumps(row), flush=True)
    return row


def hierarchy_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Hierarchy, {report['model']} {report['dtype']} (drafting tiers {report['draft_dtype']}), greedy, "
             f"{report['new_tokens']} new tokens, retrieval refresh {report['refresh']}, {m['cpu']}, {m['threads']} "
             f"threads, torch {m['torch']}, {report.get('kernels', 'torch')} kernels. Weights "
             f"{report['weights_bytes'] / 1e6:.0f} MB.", "",
             "| context | mode | tok/s | vs ar | identical | tok/target call | tiers: accepted/drafted, α, ms/call |",
             "|---|---|---|---|---|---|---|"]
    for r in report["modes"]:
        lines.append(f"| {r['context']} | {r['mode']} | {r['tok_s']} | {r['vs_ar']}x | {r['tokens_identical']} "
                     f"| {r['tokens_per_target_call']} | {tiers_text(r['tiers'])} |")
    if report["sweep"]:
        lines += ["", f"self-spec at {report['sweep'][0]['context']} tokens: retrieval tier acceptance by budget "
                      "and refresh (0 = select once after prefill)", "",
                  "| budget | refresh | accepted/drafted | α | tok/target call | tok/s | vs ar |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['budget']} | {r['refresh']} | {r['acceptance']} | {r['alpha']} | {r['tokens_per_target_call']} | {r['tok_s']} "
                  f"| {r['speedup']}x |" for r in report["sweep"]]
    return "\n".join(lines)


def script_args(ap):
    """A benchmark script's arguments: its own, after TAG (the result files' suffix, default cpu)."""
    ap.add_argument("tag", nargs="?", default="cpu")
    return ap


def result_path(name: str, tag: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}-{tag}.json")


def write_markdown(path: str, ap, args, script: str, text: str) -> None:
    """path's .md beside its .json: the command that made it (the arguments that differ from their defaults, as
    typed), then the report's text."""
    argv = []
    for a in ap._actions:
        value = getattr(args, a.dest, None)
        if a.dest == "help" or value == a.default:
            continue
        flag = [] if not a.option_strings else [a.option_strings[0]]
        argv += flag if a.nargs == 0 else flag + [str(v) for v in (value if isinstance(value, list) else [value])]
    with open(path[:-5] + ".md", "w") as f:
        name, *sub = script.split()  # "batch mixed": a script and its sub-command
        f.write(f"Command: `{' '.join(['python', f'benchmarks/{name}.py', *sub] + argv)}`\n\n{text}\n")
    print(json.dumps({"written": path}))
