"""`triforce run`: every row of an experiment, appended to results.jsonl as it finishes, then the report.

Rows: each prompt document x each context x each mode x each sweep point that matters to the mode x repeats,
plus the baselines. The modes of one (document, context) decode from one shared prefill (engine.Session), so their
timings and outputs are comparable. A row is keyed by what defines it; a re-run skips the keys already written.
"""
import itertools
import json
import os
import time
from dataclasses import replace

import torch

from ..measure import chat_prompt, hf_decode, machine
from ..engine import GenerationConfig, Session, generate
from ..runtime import set_threads
from ..settings import DRAFTER_MODES, HEAD_MODES, MODES, check_config, relevant
from ..errors import UserError
from ..jsonl import append_record, output_folder, read_records
from ..textio import LogBar, read_text
from .report import write_report
from .schema import Experiment

SAMPLING = ("temperature", "top_p", "top_k")
DEFAULT_INSTRUCTION = "Summarize the following document.\n\n"
QUICK = dict(max_new_tokens=16, context=512, sweep_values=2)


def quick(exp: Experiment) -> Experiment:
    """Every size shrunk for a smoke run: 16 new tokens, prompts of at most 512 tokens, two values per sweep key."""
    sweep = {k: sorted({min(v, QUICK["context"]) for v in vs}) if k == "context" else vs[: QUICK["sweep_values"]]
             for k, vs in exp.sweep.items()}
    prompt = replace(exp.prompt, tokens=min(exp.prompt.tokens or QUICK["context"], QUICK["context"]))
    return replace(exp, max_new_tokens=min(exp.max_new_tokens, QUICK["max_new_tokens"]), sweep=sweep, prompt=prompt,
                   repeats=1)


def documents(exp: Experiment, tokenizer) -> list:
    """(name, token ids) of each prompt document, before the context cut."""
    from ..distill.corpus import strip_html

    if exp.prompt.text is not None:
        return [("text", tokenizer(exp.prompt.text).input_ids)]
    docs = []
    for p in exp.prompt.files:
        text = read_text(p)
        docs.append((os.path.basename(p), tokenizer(strip_html(text) if p.endswith(".html") else text).input_ids))
    return docs


def prompt_ids(exp: Experiment, tokenizer, doc: list, n: int | None) -> list:
    if not exp.chat:
        return doc[:n] if n else doc
    instruction = exp.instruction or DEFAULT_INSTRUCTION
    if n is None:
        n = len(chat_prompt(tokenizer, instruction, doc, 10**9))
    return chat_prompt(tokenizer, instruction, doc, n)


def mode_params(mode: str, point: dict) -> dict:
    """The sweep values of point that change what mode computes (a baseline: the sampling ones); the others would
    repeat the same run, or name a setting the mode cannot take (draft_quant for ar)."""
    return {k: v for k, v in point.items() if k in SAMPLING or (mode in MODES and k in relevant(mode))}


def plan(exp: Experiment, docs: list) -> list:
    """Every row as (key dict): document, context, mode, its relevant sweep values, repeat."""
    contexts = exp.sweep.get("context", [exp.prompt.tokens])
    keys = [k for k in exp.sweep if k != "context"]
    rows, seen = [], set()
    for (name, _), ctx, values, r in itertools.product(docs, contexts, itertools.product(*(exp.sweep[k] for k in keys)),
                                                      range(exp.repeats)):
        point = dict(zip(keys, values))
        for mode in list(exp.modes) + list(exp.baselines):
            params = mode_params(mode, point)
            row = {"document": name, "context": ctx, "mode": mode, "params": params, "repeat": r}
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def run_experiment(exp: Experiment, out: str | None = None, is_quick: bool = False, progress: bool = True) -> str:
    """Run (or resume) exp; returns the output folder."""
    from ..models.loader import drafter_folder, load_drafter, load_model

    if is_quick:
        exp = quick(exp)
    out = out or os.path.join("runs", exp.name + ("-quick" if is_quick else ""))
    output_folder(out, "--out")
    set_threads(exp.threads)
    base = GenerationConfig(max_new_tokens=exp.max_new_tokens, temperature=exp.temperature, top_p=exp.top_p,
                            top_k=exp.top_k, seed=exp.seed, ignore_eos=exp.ignore_eos)
    for mode in exp.modes:  # impossible settings fail before any model loads
        for point in itertools.product(*([(k, v) for v in vs] for k, vs in exp.sweep.items() if k != "context")):
            check_config(replace(base, mode=mode, **mode_params(mode, dict(point))))
    path = os.path.join(out, "results.jsonl")
    try:
        done = {json.dumps(r["key"], sort_keys=True) for r in read_records(path, "key")}
    except ValueError as e:
        raise UserError(f"cannot resume from {path}: {e}") from None
    with open(os.path.join(out, "machine.json"), "w") as f:
        json.dump({**machine(), "experiment": exp.source, "quick": is_quick}, f, indent=1)

    model = load_model(exp.model, kernels=exp.kernels)
    drafter = []  # the tiny drafter and the recurrent head, for the modes that draft with them
    if any(m in DRAFTER_MODES for m in exp.modes):
        drafter.append(load_drafter(drafter_folder(exp.drafter or "default", exp.model), model))
    if any(m in HEAD_MODES for m in exp.modes):
        drafter.append(load_drafter(drafter_folder(exp.head or "default", exp.model, head=True), model))
    docs = documents(exp, model.tokenizer)
    generate(model, docs[0][1][:16], GenerationConfig(max_new_tokens=2))  # warm-up: the first row is timed fairly
    rows = [r for r in plan(exp, docs) if json.dumps(r, sort_keys=True) not in done]
    by_prompt = itertools.groupby(rows, key=lambda r: (r["document"], r["context"]))
    hf = None
    with open(path, "a") as f, LogBar(total=len(rows), desc=exp.name, unit="run", disable=not progress) as bar:
        for (name, ctx), group in by_prompt:
            ids = prompt_ids(exp, model.tokenizer, dict(docs)[name], ctx)
            group = list(group)
            cfgs = {id(row): replace(base, mode=row["mode"], **row["params"]) for row in group if row["mode"] in MODES}
            session = Session(model, [ids], [base, *cfgs.values()])  # one prefill, sized for every row's settings
            for row in group:
                t0 = time.perf_counter()
                if row["mode"] in MODES:
                    result = session.decode(cfgs[id(row)], drafter=drafter)[0].to_json()
                else:
                    hf = hf or hf_model(model)
                    result = baseline(hf, row["mode"], ids, replace(base, **row["params"]))
                append_record(f, {"key": row, "experiment": exp.name, "document": name, "context": len(ids),
                                  **row["params"], **result, "wall_seconds": round(time.perf_counter() - t0, 2)})
                bar.update(1)
    write_report(out, exp)
    return out


def hf_model(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()


def baseline(hf, name: str, ids: list, cfg) -> dict:
    """HF transformers generate (plain, or assisted by prompt lookup: HF's draft-model-free assisted generation),
    greedy or sampled as cfg says, decode tok/s as measure.hf_decode measures it."""
    kw = {"prompt_lookup_num_tokens": 10} if name == "hf-assisted" else {}
    if not cfg.sampling.greedy:
        torch.manual_seed(cfg.seed)
        kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    tokens, prefill_s, tok_s = hf_decode(hf, ids, cfg.max_new_tokens, **kw)
    return {"mode": name, "prompt_tokens": len(ids), "tokens": tokens, "new_tokens": len(tokens),
            "prefill_seconds": prefill_s, "decode_tokens_per_second": tok_s, "tiers": []}
