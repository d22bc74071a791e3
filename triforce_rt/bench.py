"""AR decode speed against HF transformers `generate`, measured in one run on real text (stdlib sources).

HF decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)), the prefill cancelling out;
ours comes from the engine's own prefill/decode split. Both are greedy fp32, so their tokens must agree.
"""
import glob
import json
import os
import platform
import sysconfig
import time

import torch

from .engine import GenerationConfig, generate
from .models import load_model


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def real_text_ids(tokenizer, n: int) -> list:
    """The first n tokens of the Python standard library's sources, in a fixed file order."""
    ids = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tokenizer(f.read()).input_ids
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError(f"only {len(ids)} tokens of stdlib text found")


def hf_decode(hf, ids: list, n: int):
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(x, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    t2 = time.perf_counter()
    return out[0, len(ids):].tolist(), t1 - t0, (n - 1) / ((t2 - t1) - (t1 - t0))


def run_ar_vs_hf(spec="default", contexts=(2048, 8064), new_tokens=64, threads=2, out=None) -> list:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = load_model(spec, dtype=torch.float32)
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
    report = {"benchmark": "ar_vs_hf", "model": spec, "dtype": "float32", "machine": machine(), "rows": rows}
    print(markdown(report))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"AR decode, {report['model']} {report['dtype']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}",
             "", "| context | ours tok/s | HF tok/s | speedup | ours prefill s | HF prefill s | tokens identical |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['context']} | {r['ours_tok_s']} | {r['hf_tok_s']} | {r['speedup']}x | {r['ours_prefill_s']} "
                     f"| {r['hf_prefill_s']} | {r['tokens_identical']} |")
    return "\n".join(lines)
