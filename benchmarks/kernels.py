"""The CPU kernels (issues #30, #33), in one run: memory bandwidth; the cost of one forward of T = 1..16 tokens
over a cache of 64, 2,048, 4,096 and 8,064 tokens with torch and numba kernels, fp32 and the GGUF's own Q4_1
blocks, each beside its memory floor (bytes read / the bandwidth measured here), with the attention kernel of
--attn auto (numba's for T <= 8) and with torch's SDPA, whose attention is also timed apart; `ar`
decode against HF generate and llama.cpp on the same GGUF at 2K and 8K, ours with both attention kernels; and
`ar` throughput at batch 1, 4 and 8. SmolLM2-135M-Instruct (Q4_1 GGUF; its fp32 conversion for torch and HF),
2 threads, greedy.

    python benchmarks/kernels.py [TAG] [--contexts 64 2048 4096 8064] [--steps 1 2 4 7 16] [--decode 2048 8064]
writes benchmarks/results/kernels-TAG.{json,md} (TAG defaults to cpu). llama.cpp comes from llama-cpp-python
(optional: `pip install llama-cpp-python`, a 12-minute build from source on 2 cores); without it its rows say so.
On a CPU with AMX the default (native) build crashed in its first eval here; the committed run used
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON".
"""
import argparse
import contextlib
import json
import time

import numba
import torch
from drivers import PROMPTS, heldout_ids, result_path, script_args, write_markdown

from retrieval_cache import FullCache, attend, cpu_attention, use_kernel
from triforce_rt.engine import GenerationConfig, generate, generate_batch, prefill
from triforce_rt.measure import chat_prompt, hf_decode, machine, publish
from triforce_rt.models import load_model
from triforce_rt.models.loader import default_gguf, resolve

VARIANTS = {"torch fp32": "torch", "numba fp32": "numba", "numba Q4_1": "numba"}  # label -> --kernels


@contextlib.contextmanager
def attention(kernel: str):
    """Every attend() inside on `kernel` ('sdpa' or 'auto')."""
    use_kernel(kernel)
    try:
        yield
    finally:
        use_kernel("auto")


@contextlib.contextmanager
def unfused(model):
    """Every block's steps through its modules (one kernel call per map, torch for the rest), not Fused."""
    fused = [block.fused for block in model.layers]
    for block in model.layers:
        block.fused = None
    try:
        yield
    finally:
        for block, f in zip(model.layers, fused):
            block.fused = f


def best(fn, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth() -> float:
    """Bytes per second that torch sums a 1 GiB fp32 tensor at (read once; best of 5)."""
    x = torch.ones(2 ** 28)
    return x.numel() * 4 / best(lambda: x.sum())


def load(label: str):
    spec = "default" if label == "numba Q4_1" else resolve("default")  # the converted fp32 folder
    return load_model(spec, kernels=VARIANTS[label])


def kv_bytes(model, n: int) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * n * 4


def parts(model, cache, n: int, T: int) -> tuple:
    """Seconds of a T-token step's main parts, apart: every linear map and the head on random inputs, and the
    30 layers' attention over the first n + T slots of cache (causal within the step), with --attn auto and SDPA."""
    c = model.config
    maps = [m for m in model.layers.modules() if hasattr(m, "in_features") or hasattr(m, "packed")]
    xs = {m: torch.randn(1, T, (m.in_features if hasattr(m, "in_features") else m.blocks.shape[1]
                               if m.blocks is not None else m.weight.shape[1])) for m in maps}
    h = torch.randn(1, T, c.hidden_size)
    with torch.inference_mode():
        linear_s = best(lambda: ([m(xs[m]) for m in maps], model.score(h)))
        q = torch.randn(1, c.num_attention_heads, T, c.head_dim)
        limits = torch.arange(n + 1, n + T + 1)[None]  # query t sees slots < n + t + 1
        mask = (torch.arange(n + T) < limits[..., None])[:, None] if T > 1 else None
        times = []
        for kernel in ("auto", "sdpa"):
            with attention(kernel):
                times.append(best(lambda: [attend(q, cache.k[i, :, :, :n + T], cache.v[i, :, :, :n + T], mask,
                                                  limits) for i in range(c.num_hidden_layers)]))
    return linear_s, *times


def step_rows(model, label: str, ids: list, contexts, steps, bw: float) -> list:
    """One forward of T tokens after a prefill of n tokens (its T slots rewritten each time), best of 5; and its
    linear maps and attention timed apart."""
    rows = []
    for n in contexts:
        cache = model.new_cache(FullCache, n + max(steps))
        prefill(model, cache, [ids[:n]], 512)
        for T in steps:
            x = torch.tensor([ids[n : n + T]])
            pos = torch.arange(n, n + T)[None]
            s = best(lambda: model(x, pos, cache))
            with attention("sdpa"):
                s_sdpa = best(lambda: model(x, pos, cache))
            with unfused(model):
                s_modules = best(lambda: model(x, pos, cache))
            lin, att, att_sdpa = parts(model, cache, n, T)
            read = model.weight_bytes() + kv_bytes(model, n + T)
            row = {"kernels": label, "context": n, "T": T, "step_ms": round(s * 1e3, 2),
                   "step_sdpa_ms": round(s_sdpa * 1e3, 2), "step_modules_ms": round(s_modules * 1e3, 2),
                   "linear_ms": round(lin * 1e3, 2),
                   "attention_ms": round(att * 1e3, 2), "attention_sdpa_ms": round(att_sdpa * 1e3, 2),
                   "floor_ms": round(read / bw * 1e3, 2), "vs_floor": round(s * bw / read, 2), "bytes_read": read}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del cache
    for r in rows:  # T tokens against one token, same context
        r["vs_T1"] = round(r["step_ms"] / next(x["step_ms"] for x in rows if x["context"] == r["context"]
                                                and x["T"] == 1), 2)
    return rows


def llama_cpp_decode(ids: list, n: int, threads: int):
    """llama.cpp on the default GGUF: (tokens, prefill s, decode tok/s), or the reason it cannot run."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    llm = Llama(model_path=default_gguf(), n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    out, t0 = [], time.perf_counter()
    for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):  # greedy
        out.append(tok)
        if len(out) == 1:
            t1 = time.perf_counter()  # prefill and the first token
        if len(out) == n:
            break
    t2 = time.perf_counter()
    del llm
    return out, t1 - t0, (n - 1) / (t2 - t1)


def decode_rows(contexts, new_tokens: int, threads: int) -> list:
    """ar with each variant, HF generate (fp32) and llama.cpp (the Q4_1 GGUF), on one held-out prompt per context."""
    from transformers import AutoModelForCausalLM

    models = {label: load(label) for label in VARIANTS}
    tok = models["numba Q4_1"].tokenizer
    hf = AutoModelForCausalLM.from_pretrained(models["torch fp32"].source, dtype=torch.float32).eval()
    instruction, source = PROMPTS["explain"]
    text = heldout_ids(tok, max(contexts), source)
    rows = []
    for n in contexts:
        ids = chat_prompt(tok, instruction, text, n)
        cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        res = {label: generate(m, ids, cfg) for label, m in models.items()}
        with attention("sdpa"):
            res["numba Q4_1, SDPA"] = generate(models["numba Q4_1"], ids, cfg)
        ref = res["torch fp32"].tokens
        row = {"context": n, **{f"{label} tok/s": round(r.decode_tokens_per_second, 2) for label, r in res.items()},
               "ours identical": all(r.tokens == ref for r in res.values())}
        hf_tokens, _, row["HF fp32 tok/s"] = hf_decode(hf, ids, new_tokens)
        row["HF identical"] = hf_tokens == ref
        row["HF fp32 tok/s"] = round(row["HF fp32 tok/s"], 2)
        got = llama_cpp_decode(ids, new_tokens, threads)
        if isinstance(got, str):
            row["llama.cpp"] = got
        else:
            row["llama.cpp Q4_1 tok/s"] = round(got[2], 2)
            row["llama.cpp prefill s"] = round(got[1], 2)
            row["llama.cpp same tokens"] = next((i for i, (a, b) in enumerate(zip(got[0], ref)) if a != b), len(ref))
        row["ours prefill s"] = round(res["numba Q4_1"].prefill_seconds, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def batch_rows(model, context: int, batches, new_tokens: int) -> list:
    """ar throughput (all rows' new tokens / decode seconds) with B different held-out prompts decoded together,
    with --attn auto and with SDPA."""
    instruction, source = PROMPTS["summarize"]
    text = heldout_ids(model.tokenizer, max(batches) * context, source)
    prompts = [chat_prompt(model.tokenizer, instruction, text[i * context:], context) for i in range(max(batches))]
    rows, one = [], None
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    generate_batch(model, [p[:64] for p in prompts[:2]], GenerationConfig(max_new_tokens=2))  # compile batch paths
    for B in batches:
        tps = []
        for kernel in ("auto", "sdpa"):
            with attention(kernel):
                res = generate_batch(model, prompts[:B], cfg)
            tps.append(sum(r.new_tokens - 1 for r in res) / max(r.decode_seconds for r in res))
        one = one or tps[0]
        rows.append({"batch": B, "context": context, "tok_s": round(tps[0], 2), "vs_B1": round(tps[0] / one, 2),
                     "sdpa_tok_s": round(tps[1], 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run(contexts, steps, decode_contexts, batches, batch_context, new_tokens, threads, out) -> dict:
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    report = {"benchmark": "kernels", "model": "SmolLM2-135M-Instruct", "machine": machine(), "threads": threads,
              "bandwidth_GBs": round(bandwidth() / 1e9, 2), "steps": [], "decode": [], "batch": []}
    bw = report["bandwidth_GBs"] * 1e9
    print(json.dumps({"bandwidth_GBs": report["bandwidth_GBs"]}), flush=True)
    for label in VARIANTS:
        model = load(label)
        ids = heldout_ids(model.tokenizer, max(contexts) + max(steps), "stdlib")
        generate(model, ids[:64], GenerationConfig(max_new_tokens=4))  # warm-up (numba's first call loads its code)
        report["steps"] += step_rows(model, label, ids, contexts, steps, bw)
        report["weights_bytes"] = {**report.get("weights_bytes", {}), label: model.weight_bytes()}
        if label == "numba Q4_1":
            report["batch"] = batch_rows(model, batch_context, batches, new_tokens)
        del model
    report["decode"] = decode_rows(decode_contexts, new_tokens, threads)
    publish(report, markdown, out)
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"{report['model']}, {m['cpu']}, {report['threads']} threads, torch {m['torch']}. Memory bandwidth "
             f"(torch sum of 1 GiB, best of 5): **{report['bandwidth_GBs']} GB/s**. Weights read per step: "
             + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in report["weights_bytes"].items()) + ".", "",
             "### One forward of T tokens (best of 5), against its floor (weights + KV bytes / bandwidth)", "",
             "Linear maps (with the head) and attention (30 layers) are timed apart, on the same shapes; the rest of "
             "a step is the small operations around them (norms, RoPE, cache writes, residuals). Step and attention "
             f"with `--attn auto` (numba's kernel for T <= {cpu_attention.MAX_T}, SDPA otherwise) and with SDPA; "
             "× floor and × T=1 are of the auto step. On the numba kernels a block's step is three calls (Fused: "
             "norms, maps, residuals and SwiGLU in two numba calls around the cache's, which rotates, writes the new "
             "keys and values and attends in one); `modules` is the same step through the block's modules, one "
             "kernel call per map. The attention columns time attend() alone (the cache's reads, no RoPE or "
             "writes).", "",
             "| kernels | context | T | step ms | step ms, SDPA | step ms, modules | linear ms | attention ms | "
             "attention ms, SDPA | floor ms | × floor | × T=1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        lines.append(f"| {r['kernels']} | {r['context']} | {r['T']} | {r['step_ms']} | {r['step_sdpa_ms']} | "
                     f"{r['step_modules_ms']} | {r['linear_ms']} | {r['attention_ms']} | {r['attention_sdpa_ms']} | {r['floor_ms']} | "
                     f"{r['vs_floor']} | {r['vs_T1']} |")
    lines += ["", "### `ar` decode (64 greedy tokens, held-out code prompt) against HF generate and llama.cpp", ""]
    keys = [k for k in report["decode"][0] if k != "context"]
    lines += ["| context | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in report["decode"]:
        lines.append(f"| {r['context']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    lines += ["", "### `ar` batch throughput, numba Q4_1 (attention: `--attn auto`, and SDPA)", "",
              "| batch | context | tok/s | × B=1 | tok/s, SDPA |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['context']} | {r['tok_s']} | {r['vs_B1']} | {r['sdpa_tok_s']} |"
              for r in report["batch"]]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 2048, 4096, 8064])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 7, 16])
    ap.add_argument("--decode", type=int, nargs="+", default=[2048, 8064])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batch-context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    path = result_path("kernels", args.tag)
    report = run(args.contexts, args.steps, args.decode, args.batches, args.batch_context, args.new_tokens, 2, path)
    write_markdown(path, ap, args, "kernels", markdown(report))
