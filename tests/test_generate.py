"""Autoregressive generation: SmolLM2 against HF generate, sampling controls, EOS and streaming."""
import torch
from conftest import hf_model, ours, stdlib_text

from triforce_rt import GenerationConfig, generate
from triforce_rt.sampling import SamplingParams, probs


def test_smollm2_greedy_matches_hf_generate(smol, smol_hf):
    text = stdlib_text("textwrap.py")
    ids = smol.tokenizer(text).input_ids[:1600]
    assert len(ids) >= 1500
    res = generate(smol, ids, GenerationConfig(max_new_tokens=48, ignore_eos=True, prefill_chunk=512))
    with torch.no_grad():
        ref = smol_hf.generate(torch.tensor([ids]), max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert res.tokens == ref[0, len(ids):].tolist()
    assert res.text == smol.tokenizer.decode(res.tokens, skip_special_tokens=True)
    assert res.prompt_tokens == len(ids) and res.new_tokens == 48
    tier = res.tiers[0]
    assert tier["name"] == "target" and tier["calls"] == 47 and tier["drafted"] == 0


def test_sampling_is_seeded_and_streams():
    model = ours(hf_model(seed=5))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=40, seed=11, ignore_eos=True)
    seen = []
    a = generate(model, [1, 2, 3], cfg, on_token=seen.append)
    b = generate(model, [1, 2, 3], cfg)
    c = generate(model, [1, 2, 3], GenerationConfig(**{**cfg.__dict__, "seed": 12}))
    assert a.tokens == b.tokens == seen
    assert a.tokens != c.tokens


def test_top_k_one_is_greedy():
    model = ours(hf_model(seed=6))
    greedy = generate(model, [4, 5, 6], GenerationConfig(max_new_tokens=12, ignore_eos=True))
    top1 = generate(model, [4, 5, 6], GenerationConfig(max_new_tokens=12, ignore_eos=True, temperature=0.7, top_k=1))
    assert greedy.tokens == top1.tokens


def test_eos_stops_generation():
    model = ours(hf_model(seed=7))
    free = generate(model, [7, 8], GenerationConfig(max_new_tokens=30, ignore_eos=True))
    model.config.eos_token_ids = (free.tokens[5],)
    stopped = generate(model, [7, 8], GenerationConfig(max_new_tokens=30))
    assert stopped.tokens == free.tokens[: free.tokens.index(free.tokens[5]) + 1]


def test_probs_top_p_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    p = probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits / 0.5, -1))
