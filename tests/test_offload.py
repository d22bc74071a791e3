"""Weights and the full KV cache streamed from host memory (offload.WeightStream, offload.KVStream) give exactly the
resident outputs. On CPU the copies are synchronous, which checks the buffer order; on CUDA the copy stream and its
events are checked too."""
import pytest
import torch
from conftest import hf_model, ours, stdlib_text

from offload import WeightStream
from retrieval_cache import FullCache
from triforce_rt import load_model
from triforce_rt.engine import GenerationConfig, generate, prefill
from triforce_rt.errors import UserError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, copy stream)")


@pytest.mark.parametrize("layers,resident", [(4, 0), (5, 0), (5, 2), (6, 3), (3, 2)])
def test_streamed_layers_equal_resident(layers, resident):
    """Even and odd streamed counts (the odd one wraps into the buffer it just used), resident layers first, and a
    single streamed layer (kept on the device); prefill then decode steps, bitwise."""
    hf = hf_model(num_hidden_layers=layers, seed=layers)
    plain, streamed = ours(hf), ours(hf)
    ws = WeightStream(streamed.layers, "cpu", resident)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (plain, streamed):
        cache = m.new_cache(FullCache, 64)
        got = [prefill(m, cache, [ids[0, :30].tolist()], 8)]
        got += [m(ids[:, t : t + 1], torch.tensor([[t]]), cache)[:, -1] for t in range(30, 40)]
        outs.append(torch.cat(got))
    assert torch.equal(outs[0], outs[1])
    n = layers - resident if layers - resident >= 2 else 0
    assert ws.streamed == n
    if n:
        assert ws.copies == 1 + n * (4 + 10)  # the first load, then every streamed layer in each of 14 forwards


def test_smollm2_offloaded_generation_equals_resident(smol):
    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:700]
    cfg = dict(max_new_tokens=16, ignore_eos=True, budget=128, prefill_chunk=256)
    off = load_model("default", offload="weights", resident_layers=7)
    assert off.runtime.weight_stream.streamed == 23
    for mode in ("ar", "self-spec"):
        assert generate(off, ids, GenerationConfig(mode=mode, **cfg)).tokens == \
            generate(smol, ids, GenerationConfig(mode=mode, **cfg)).tokens, mode
    with pytest.raises(UserError, match="draft-dtype"):
        generate(off, ids, GenerationConfig(mode="self-spec", draft_dtype="bfloat16", **cfg))


@needs_cuda
def test_cuda_offloaded_generation_equals_resident():
    """Pinned host weights and KV, two device buffers each and a copy stream, against the model resident on the GPU
    (bf16)."""
    ids = load_model("default").tokenizer(stdlib_text("textwrap.py")).input_ids[:3000]
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True, budget=256)
    resident = load_model("default", device="cuda")
    want = {m: generate(resident, ids, GenerationConfig(**{**cfg.__dict__, "mode": m})).tokens for m in ("ar", "self-spec")}
    del resident
    for how, k in (("weights", 0), ("weights", 5), ("kv", 0), ("all", 5)):
        off = load_model("default", device="cuda", offload=how, resident_layers=k)
        for m in want:
            assert generate(off, ids, GenerationConfig(**{**cfg.__dict__, "mode": m})).tokens == want[m], (how, k, m)
        del off


@pytest.mark.parametrize("mode", ["ar", "self-spec", "triforce", "streaming-spec", "ngram"])
def test_host_kv_cache_gives_the_resident_tokens(mode):
    """The full KV cache in host memory, streamed per layer (offload.KVStream): every mode's greedy tokens equal
    the resident cache's, including retrieval selection (scored where the keys live) and refresh."""
    from test_hierarchy import random_pair

    target, drafter = random_pair(3, 2)
    prompt = torch.randint(0, 64, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = GenerationConfig(mode=mode, max_new_tokens=30, ignore_eos=True, budget=16, chunk_size=4, sinks=2, window=40,
                           refresh=7, prefill_chunk=32)
    want = generate(target, prompt, cfg, drafter=drafter).tokens
    target.runtime.kv_offload = True
    assert generate(target, prompt, cfg, drafter=drafter).tokens == want


def test_kv_stream_copies_each_layer_once_per_forward():
    from offload import KVStream

    hf = hf_model(num_hidden_layers=3, seed=1)
    plain, host = ours(hf), ours(hf)
    a, b = plain.new_cache(FullCache, 64), host.new_cache(FullCache, 64, store=KVStream)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1))
    for cache, m in ((a, plain), (b, host)):
        prefill(m, cache, [ids[0, :20].tolist()], 8)
    outs = [torch.cat([m(ids[:, t : t + 1], torch.tensor([[t]]), c)[:, -1] for t in range(20, 24)]) for m, c in
            ((plain, a), (host, b))]
    assert torch.equal(outs[0], outs[1])
    b.settle()
    assert torch.equal(a.k[:, :, :, :24], b.k[:, :, :, :24])
    layer_bytes = 2 * b.k[0].numel() * b.k.element_size()
    assert b.store.copied == (3 + 4) * 3 * layer_bytes  # 3 prefill + 4 decode forwards, 3 layers each


def test_kv_offload_refuses_a_batch(smol):
    from triforce_rt.engine import generate_batch

    smol.runtime.kv_offload = True
    try:
        with pytest.raises(UserError, match="one sequence at a time"):
            generate_batch(smol, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=2))
    finally:
        smol.runtime.kv_offload = False
