"""The GPU path. Fixed-shape steps (cuda_graphs.StepGraphs over caches in static mode): on CPU the same API runs
eagerly and must equal the plain forward; on CUDA the replayed graphs must give the eager tokens. The attention
kernel switch: one choice for every cache, flash-attn against SDPA where flash-attn is installed."""
import pytest
import torch
from conftest import child_env, stdlib_text
from test_caches import H_KV, ROPE, step, tokens
from test_hierarchy import random_pair, with_head

from cuda_graphs import StepGraphs
from retrieval_cache import FullCache, RetrievalCache, StreamingCache, use_kernel
from retrieval_cache.attention import flash_available
from triforce_rt.engine import GenerationConfig, generate, generate_batch
from triforce_rt.settings import MODES

D = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (graph capture and replay)")


def caches(static: bool):
    full = FullCache(1, H_KV, D, max_len=64)
    made = [full, StreamingCache(1, H_KV, D, sinks=2, window=5, max_step=20)]
    for c in made:
        c.static = static
    return made


def test_static_caches_equal_dynamic_caches():
    """Every step of a static cache (all slots attended, masked by position) equals the dynamic step: prefill,
    decode, a rejected speculation, its rewrite; and a retrieval cache selected from each full cache."""
    q, k, v = tokens(40, seed=3)
    plan = [(0, 20), (20, 21), (21, 26), (21, 23), (23, 24)]  # (start, end): 21..25 is rejected after 21, 22
    outs = {}
    for static in (False, True):
        full, stream = caches(static)
        got = [step(c, q[a:b], k[a:b], v[a:b], a) for a, b in plan for c in (full, stream)]
        rc = RetrievalCache(1, H_KV, D, budget=8, chunk_size=4, tail=6)
        rc.static = static
        rc.select(full, [24])
        got += [step(rc, q[a:b], k[a:b], v[a:b], a) for a, b in [(24, 25), (24, 27), (27, 28)]]
        outs[static] = got
    for dyn, sta in zip(outs[False], outs[True]):
        # Not bitwise: the static softmax also sums the masked slots' exact zeros, which changes the kernel's
        # blocking; measured differences are at most 3e-7, fp32 rounding.
        assert torch.allclose(dyn, sta, atol=1e-6, rtol=0)


def test_step_graphs_run_eagerly_without_cuda():
    calls = []
    g = StepGraphs(lambda x: calls.append(1) or x * 2, enabled=True)
    x = torch.arange(3.0)
    assert torch.equal(g(x), x * 2) and len(calls) == 1 and g.replays == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_static_tiers_give_ar_tokens_in_every_mode(seed):
    """A model that asks for graphs runs every tier's cache in static mode (eagerly on CPU): every mode, batched
    over 3 ragged prompts with rows leaving at an EOS, still gives each prompt's ar tokens."""
    target, drafter = random_pair(seed, [4, 2, 1][seed])
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (37, 12, 97)]
    cfg = dict(max_new_tokens=30, budget=16, chunk_size=4, gamma1=3, gamma2=5, sinks=2, window=40,
               refresh=[0, 3, 10][seed])
    free = generate(target, prompts[1], GenerationConfig(ignore_eos=True, **cfg)).tokens
    target.config.eos_token_ids = [free[len(free) // 2]]
    alone = [generate(target, p, GenerationConfig(**cfg)).tokens for p in prompts]
    target.runtime.cuda_graphs = drafter.runtime.cuda_graphs = True
    drafter = with_head(target, drafter, seed)
    for mode in MODES:
        got = generate_batch(target, prompts, GenerationConfig(mode=mode, **cfg), drafter=drafter)
        assert [r.tokens for r in got] == alone, mode


@needs_cuda
@pytest.mark.parametrize("mode", ["ar", "self-spec", "triforce", "streaming-spec"])
def test_cuda_graphs_equal_eager_on_smollm2(smol, tiny_drafter, mode):
    """Graph replay against eager on the GPU, greedy, on a real 3,000-token prompt; refresh re-selects the
    retrieval cache in place while its graphs stay bound."""
    model, drafter = smol.to("cuda"), tiny_drafter.to("cuda")
    model.setup_rope(), drafter.setup_rope()
    ids = model.tokenizer(stdlib_text("textwrap.py")).input_ids[:3000]
    cfg = GenerationConfig(mode=mode, max_new_tokens=64, ignore_eos=True, budget=256, sinks=4, window=56, refresh=16)
    try:
        eager = generate(model, ids, cfg, drafter=drafter).tokens
        model.runtime.cuda_graphs = drafter.runtime.cuda_graphs = True
        graphed = generate(model, ids, cfg, drafter=drafter).tokens
    finally:
        model.runtime.cuda_graphs = drafter.runtime.cuda_graphs = False
        model.to("cpu").setup_rope(), drafter.to("cpu").setup_rope()
    assert graphed == eager


def test_kernel_switch():
    try:
        assert use_kernel("sdpa") == "sdpa"
        if not flash_available():
            with pytest.raises(ValueError, match="flash-attn"):
                use_kernel("flash")
        with pytest.raises(ValueError, match="unknown attention kernel"):
            use_kernel("xformers")
    finally:
        assert use_kernel("auto") == ("flash" if flash_available() else "numba")


@pytest.mark.skipif(not flash_available(), reason="needs CUDA and the flash-attn package (not installed here)")
@pytest.mark.parametrize("mode", ["ar", "self-spec"])
def test_flash_equals_sdpa_on_smollm2(mode):
    from triforce_rt import load_model

    model = load_model("default", device="cuda")
    ids = model.tokenizer(stdlib_text("textwrap.py")).input_ids[:3000]
    cfg = GenerationConfig(mode=mode, max_new_tokens=64, ignore_eos=True, budget=256)
    try:
        use_kernel("sdpa")
        sdpa = generate(model, ids, cfg).tokens
        use_kernel("flash")
        flash = generate(model, ids, cfg).tokens
    finally:
        use_kernel("auto")
    assert flash == sdpa


def test_gpu_benchmark_script_runs(tmp_path):
    """benchmarks/gpu.py --smoke: every part of the GPU benchmark on tiny shapes (here on CPU), so the script is
    known to run before a GPU is at hand. Its timings mean nothing; its structure and exactness do."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu.py"), "--smoke", "--tag", "t",
                    "--out", str(tmp_path)], check=True, capture_output=True, text=True, env=child_env())
    rep = json.loads((tmp_path / "gpu-t.json").read_text())
    assert [r["graphs"] for r in rep["onchip"]] == [False, True]
    assert all(r["projected"]["speedup"] > 0 for r in rep["onchip"])
    assert [(r["kv"], r["streamed_layers"]) for r in rep["offload"]] == [("gpu", 3), ("host", 3)]
    assert all(r["tokens_identical"] for r in rep["end_to_end"])
    assert (tmp_path / "gpu-t.md").read_text().startswith("GPU benchmark")
