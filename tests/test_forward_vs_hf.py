"""Our forward against transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM in fp32."""
import pytest
import torch
from conftest import hf_model, ours

from retrieval_cache import FullCache, RetrievalCache
from triforce_rt.engine import prefill
from triforce_rt.models.kernels import use_numba

TOL = 1e-4
CONFIGS = {
    "llama-mha-tied": dict(kind="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama-gqa-untied": dict(kind="llama"),
    "llama-linear": dict(kind="llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "llama-dynamic": dict(kind="llama", max_position_embeddings=32,
                          rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
    "llama3": dict(kind="llama", rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                  "rope_theta": 500000.0}),
    "llama-yarn": dict(kind="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 16}),
    "llama-attention-bias": dict(kind="llama", attention_bias=True),
    "qwen2-qkv-bias": dict(kind="qwen2"),
    "qwen2-tied-gqa3": dict(kind="qwen2", num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                            tie_word_embeddings=True),
    "mistral": dict(kind="mistral", sliding_window=None),
}


def reference(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_full_sequence(name):
    hf = hf_model(**CONFIGS[name])
    model = ours(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(FullCache, 64, batch=2)
    got = model(ids, torch.arange(48).expand(2, -1), cache)
    assert (got - reference(hf, ids)).abs().max() <= TOL


@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "llama-dynamic"])  # dynamic NTK depends on the step split
def test_chunked_prefill_verify_and_decode(name, kernels):
    """Chunked prefill, then a 5-token verify-shaped step, then single-token decodes, all against one HF pass; on
    the numba kernels every one of these steps runs as Fused blocks (biases and GQA included)."""
    hf = hf_model(**CONFIGS[name])
    model = ours(hf)
    if kernels == "numba":
        use_numba(model)
        assert all(block.fused is not None for block in model.layers)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    ref = reference(hf, ids)[0]
    cache = model.new_cache(FullCache, 64)
    last = prefill(model, cache, ids[:, :30].tolist(), chunk=7)
    assert (last[0] - ref[29]).abs().max() <= TOL
    verify = model(ids[:, 30:35], torch.arange(30, 35)[None], cache)[0]
    assert (verify - ref[30:35]).abs().max() <= TOL
    for t in range(35, 40):
        step = model(ids[:, t : t + 1], torch.tensor([[t]]), cache)[0, 0]
        assert (step - ref[t]).abs().max() <= TOL


def test_rejected_draft_then_new_tokens_matches_fresh_run():
    hf = hf_model()
    model = ours(hf)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (1, 30), generator=g)
    wrong = torch.randint(0, 96, (1, 6), generator=g)
    cache = model.new_cache(FullCache, 64)
    prefill(model, cache, ids[:, :24].tolist(), chunk=8)
    model(wrong, torch.arange(24, 30)[None], cache)  # a rejected speculation: the next step rewrites its slots
    got = model(ids[:, 24:], torch.arange(24, 30)[None], cache)[0]
    assert (got - reference(hf, ids)[0, 24:]).abs().max() <= TOL


def test_retrieval_with_whole_context_budget_equals_full():
    """A retrieval budget that holds every chunk attends to everything: same logits as the full cache."""
    hf = hf_model()
    model = ours(hf)
    ids = torch.randint(0, 96, (1, 44), generator=torch.Generator().manual_seed(4))
    full = model.new_cache(FullCache, 64)
    prefill(model, full, ids[:, :37].tolist(), chunk=16)  # 37 tokens: 5 chunks of 8, the last one partial
    rc = model.new_cache(RetrievalCache, 64, 8, 8)
    rc.select(full, [37])
    got = model(ids[:, 37:], torch.arange(37, 44)[None], rc)[0]
    assert (got - reference(hf, ids)[0, 37:]).abs().max() <= TOL
