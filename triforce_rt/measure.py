"""Measurements the package itself runs: the machine a result came from, HF transformers' decode speed (the
`triforce bench` verb, AR against HF `generate`, and the experiment runner's baselines) and the chat request a
benchmark prompt is wrapped in. The benchmark drivers live in benchmarks/.

HF decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)), the prefill cancelling out;
ours comes from the engine's own prefill/decode split. Both are greedy fp32, so their tokens must agree.
"""
import json
import time

import torch

from .calibration import machine
from .engine import GenerationConfig, generate
from .models import load_model
from .runtime import set_threads
from .textio import encode


def real_text_ids(tokenizer, n: int) -> list:
    """The first n tokens of the corpus's Python standard library sources (its top folder), in name order."""
    from .distill.corpus import members, read

    ids = []
    for name in sorted(m for m in members() if m.count("/") == 1 and m.startswith("stdlib/")):
        ids += tokenizer(read("stdlib", name)).input_ids
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError(f"only {len(ids)} tokens of stdlib text found")


def hf_decode(hf, ids: list, n: int, **generate_kw):
    """HF generate, greedy unless generate_kw says otherwise: (new tokens, prefill seconds, decode tok/s).
    generate_kw: e.g. prompt lookup, or do_sample with temperature and top_p."""
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        kw = {"do_sample": False, **generate_kw}
        hf.generate(x, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
    t2 = time.perf_counter()
    return out[0, len(ids):].tolist(), t1 - t0, (n - 1) / ((t2 - t1) - (t1 - t0))


def run_ar_vs_hf(spec="default", contexts=(2048, 8064), new_tokens=64, threads=2, out=None, kernels="auto") -> list:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    set_threads(threads)
    model = load_model(spec, dtype=torch.float32, kernels=kernels)
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    ids_all = real_text_ids(model.tokenizer, max(contexts))
    generate(model, ids_all[:64], GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    rows = []
    for n_ctx in contexts:
        ids = ids_all[:n_ctx]
        res = generate(model, ids, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        hf_tokens, hf_prefill, hf_tps = hf_decode(hf, ids, new_tokens)
        row = {"context": n_ctx, "new_tokens": new_tokens, "ours_tok_s": round(res.decode_tokens_per_second, 2),
               "hf_tok_s": round(hf_tps, 2), "speedup": round(res.decode_tokens_per_second / hf_tps, 2),
               "ours_prefill_s": round(res.prefill_seconds, 2), "hf_prefill_s": round(hf_prefill, 2),
               "tokens_identical": res.tokens == hf_tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
    publish({"benchmark": "ar_vs_hf", "model": spec, "dtype": "float32", "kernels": model.runtime.kernels,
             "machine": machine(), "rows": rows}, markdown, out)
    return rows


def publish(report: dict, to_markdown, out: str | None) -> None:
    """Print the report's table; write the report as JSON to out, when given."""
    print(to_markdown(report))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"AR decode, {report['model']} {report['dtype']}, {report.get('kernels', 'torch')} kernels, {m['cpu']}, "
             f"{m['threads']} threads, torch {m['torch']}",
             "", "| context | ours tok/s | HF tok/s | speedup | ours prefill s | HF prefill s | tokens identical |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['context']} | {r['ours_tok_s']} | {r['hf_tok_s']} | {r['speedup']}x | {r['ours_prefill_s']} "
                     f"| {r['hf_prefill_s']} | {r['tokens_identical']} |")
    return "\n".join(lines)


def chat_prompt(tokenizer, instruction: str, doc_ids: list, n: int) -> list:
    """A chat request about the document, n tokens in all (a raw-code prompt makes a 135M model loop)."""
    wrap = lambda k: encode(tokenizer, instruction + tokenizer.decode(doc_ids[:k]), chat=True)
    k = n - (len(wrap(16)) - 16)
    ids = wrap(k)
    while len(ids) > n:  # decode/encode can merge tokens differently; trim until it fits
        k -= len(ids) - n
        ids = wrap(k)
    return list(ids)
