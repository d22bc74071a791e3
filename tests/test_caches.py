"""Caches against brute-force references: what each query sees, the chunks chosen, and rejected drafts being
invisible (caches are addressed by position, so rolling back moves no data)."""
import math

import pytest
import torch

from retrieval_cache import FullCache, RetrievalCache, StreamingCache
from triforce_rt.models import ModelConfig
from triforce_rt.models.rope import Rope

H_KV, G, D = 2, 2, 16
H_Q = H_KV * G
ROPE = Rope(ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=H_Q, num_key_value_heads=H_KV, head_dim=D, max_position_embeddings=512))


def rot(x, pos):
    """RoPE of one vector x [D] at an integer position."""
    cos, sin = ROPE.cos_sin(torch.tensor([[pos]]))
    x1, x2 = x.chunk(2)
    return x * cos[0, 0] + torch.cat((-x2, x1)) * sin[0, 0]


def softmax_attend(q, keys, values):
    w = torch.softmax(torch.stack([q @ k for k in keys]) / math.sqrt(D), 0)
    return sum(wi * v for wi, v in zip(w, values))


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H_Q, D, generator=g), torch.randn(n, H_KV, D, generator=g), torch.randn(n, H_KV, D, generator=g))


def step(cache, q, k, v, start, layers=1):
    """Feed tokens start.. of (q, k, v) [T, H, D] as one step; returns the output of layer 0 [T, Hq, D]."""
    T = q.shape[0]
    cache.begin(torch.arange(start, start + T)[None], ROPE)
    outs = [cache.attend(layer, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
            for layer in range(layers)]
    return outs[0][0].transpose(0, 1)


# ---- StreamingCache -------------------------------------------------------------------------------------------

def streaming_reference(q, k, v, p, S, W):
    """StreamingLLM for query p: sinks then window, keys rotated by slot index, the query at the last slot."""
    visible = [i for i in range(min(S, p + 1))] + list(range(max(S, p - W + 1), p + 1))
    out = torch.empty(H_Q, D)
    for h in range(H_Q):
        kv = h // G
        keys = [rot(k[j, kv], slot) for slot, j in enumerate(visible)]
        out[h] = softmax_attend(rot(q[p, h], len(visible) - 1), keys, [v[j, kv] for j in visible])
    return out


@pytest.mark.parametrize("S,W", [(4, 6), (0, 5), (2, 1), (3, 40)])
def test_streaming_matches_streamingllm_with_rollback(S, W):
    n = 30
    q, k, v = tokens(n, seed=S * 100 + W)
    junk = tokens(4, seed=7)
    cache = StreamingCache(1, H_KV, D, sinks=S, window=W, max_step=6)
    pos = 0
    for i, T in enumerate([5, 1, 3, 1, 1, 6, 2, 1, 4, 1, 1, 4]):
        if i % 3 == 2:  # a rejected speculation of 4 tokens at the next positions, then the accepted ones
            step(cache, *junk, pos)
        got = step(cache, q[pos : pos + T], k[pos : pos + T], v[pos : pos + T], pos)
        for t in range(T):
            assert torch.allclose(got[t], streaming_reference(q, k, v, pos + t, S, W), atol=1e-5), (pos + t)
        pos += T


@pytest.mark.parametrize("L,S,W", [(30, 4, 6), (5, 4, 6), (30, 0, 8)])
def test_streaming_filled_from_full_cache(L, S, W):
    """MagicDec's draft cache: the sinks and last W keys of a full-attention cache, then StreamingLLM steps."""
    q, k, v = tokens(L + 3, seed=L + S)
    full = FullCache(1, H_KV, D, max_len=64)
    step(full, q[:L], k[:L], v[:L], 0)
    cache = StreamingCache(1, H_KV, D, sinks=S, window=W, max_step=4)
    cache.fill_from(full, [L], ROPE)
    got = step(cache, q[L:], k[L:], v[L:], L)
    for t in range(3):
        assert torch.allclose(got[t], streaming_reference(q, k, v, L + t, S, W), atol=1e-5), t


# ---- RetrievalCache -------------------------------------------------------------------------------------------

def filled_full_cache(L, layers, seed):
    q, k, v = tokens(L, seed)
    full = FullCache(layers, H_KV, D, max_len=64)
    step(full, q, k, v, 0, layers)  # the same k, v in every layer; scores differ through the query below
    return full, k, v


@pytest.mark.parametrize("L,budget,c", [(45, 24, 8), (64, 16, 4), (13, 40, 8), (30, 8, 8)])
def test_retrieval_selects_top_chunks_and_attends_like_masked_full(L, budget, c):
    layers = 2
    full, k, v = filled_full_cache(L, layers, seed=L)
    sel_q = torch.randn(layers, 1, H_Q, D, generator=torch.Generator().manual_seed(9))
    rc = RetrievalCache(layers, H_KV, D, budget=budget, chunk_size=c, tail=5)
    rc.select(full, [L], sel_q)

    k_rot = torch.stack([torch.stack([rot(k[j, h], j) for h in range(H_KV)]) for j in range(L)])  # [L, Hkv, D]
    n_chunks, n_sel = L // c, min(budget // c, L // c)  # whole chunks compete; a partial last one is in the tail
    chosen = {}
    for layer in range(layers):
        for h in range(H_KV):
            means = [k_rot[n * c : (n + 1) * c, h].mean(0) for n in range(n_chunks)]
            score = [sum(float(sel_q[layer, 0, h * G + g] @ m) for g in range(G)) for m in means]
            best = sorted(range(1, n_chunks), key=lambda n: -score[n])[: n_sel - 1]
            chosen[layer, h] = sorted([0] + best)
            assert rc.chunks[layer, 0, h, :n_sel].tolist() == chosen[layer, h]
    assert rc.all_valid == (budget // c <= L // c)  # every gathered slot a token: queries see a prefix (one call)

    # Three new tokens attend to the selected chunks, the partial last chunk and themselves (causal), exactly as
    # masked full attention.
    nq, nk, nv = tokens(3, seed=99)
    step(rc, *tokens(3, seed=98), L, layers)  # a rejected speculation at the same positions, then the real tokens
    got = step(rc, nq, nk, nv, L, layers)
    for t in range(3):
        for hq in range(H_Q):
            h = hq // G
            pos = [j for n in chosen[0, h] for j in range(n * c, (n + 1) * c)] + list(range(L // c * c, L))
            keys = [k_rot[j, h] for j in pos] + [rot(nk[i, h], L + i) for i in range(t + 1)]
            vals = [v[j, h] for j in pos] + [nv[i, h] for i in range(t + 1)]
            want = softmax_attend(rot(nq[t, hq], L + t), keys, vals)
            assert torch.allclose(got[t, hq], want, atol=1e-5)


def test_reselect_keeps_committed_chunk_means_and_equals_a_fresh_select():
    """A refresh re-reads only chunks at or past the shortest row's length: it must select and gather exactly what a
    new cache selecting from scratch does, after slots past the lengths were rewritten and after a row left."""
    layers, c, g = 2, 4, torch.Generator().manual_seed(3)

    def write(full, start, T, seed):  # both rows get new tokens at positions start .. start+T-1
        q, k, v = (torch.randn(2, h, T, D, generator=torch.Generator().manual_seed(seed)) for h in (H_Q, H_KV, H_KV))
        full.begin(torch.arange(start, start + T).expand(2, T), ROPE)
        for layer in range(layers):
            full.attend(layer, q, k, v)

    def same(a, b):
        assert torch.equal(a.chunks, b.chunks) and torch.equal(a.valid, b.valid) and torch.equal(a.base, b.base)
        assert torch.equal(a.k[:, :, :, : a.sel_len], b.k[:, :, :, : b.sel_len])
        assert torch.equal(a.v[:, :, :, : a.sel_len], b.v[:, :, :, : b.sel_len])

    full = FullCache(layers, H_KV, D, max_len=64, batch=2)
    write(full, 0, 30, seed=1)
    rc = RetrievalCache(layers, H_KV, D, budget=12, chunk_size=c, tail=4, batch=2)
    rc.select(full, [21, 13], torch.randn(layers, 2, H_Q, D, generator=g))
    write(full, 21, 15, seed=2)  # rewrites slots past both lengths (rejected drafts, then accepted tokens)
    for lengths in ([30, 20], [36, 33]):
        q = torch.randn(layers, 2, H_Q, D, generator=g)
        fresh = RetrievalCache(layers, H_KV, D, budget=12, chunk_size=c, tail=4, batch=2)
        rc.select(full, lengths, q)
        fresh.select(full, lengths, q)
        same(rc, fresh)
    assert rc.final == 33 // c
    full.keep([1])
    rc.keep([1])
    write_one = torch.arange(36, 40)[None]
    full.begin(write_one, ROPE)
    for layer in range(layers):
        full.attend(layer, *(torch.randn(1, h, 4, D, generator=g) for h in (H_Q, H_KV, H_KV)))
    q = torch.randn(layers, 1, H_Q, D, generator=g)
    fresh = RetrievalCache(layers, H_KV, D, budget=12, chunk_size=c, tail=4)
    rc.select(full, [40], q)
    fresh.select(full, [40], q)
    same(rc, fresh)


def test_rejected_slots_are_invisible_until_rewritten():
    """A FullCache query at position p sees slots <= p only: a rejected draft's keys past p change nothing."""
    L = 20
    q, k, v = tokens(L + 4, seed=1)
    clean = FullCache(1, H_KV, D, max_len=64)
    step(clean, q[:L], k[:L], v[:L], 0)
    want = step(clean, q[L:L + 1], k[L:L + 1], v[L:L + 1], L)
    dirty = FullCache(1, H_KV, D, max_len=64)
    step(dirty, q[:L], k[:L], v[:L], 0)
    step(dirty, *tokens(4, seed=5), L)  # a rejected speculation at positions L..L+3
    assert torch.equal(step(dirty, q[L:L + 1], k[L:L + 1], v[L:L + 1], L), want)


def test_rows_at_different_positions_match_each_row_alone():
    """Two rows of a batch at different lengths, stepping together, give what each row gives alone (every cache)."""
    makers = [lambda B: FullCache(1, H_KV, D, max_len=64, batch=B),
              lambda B: StreamingCache(1, H_KV, D, sinks=2, window=5, max_step=20, batch=B)]
    seqs = [tokens(30, seed=11), tokens(30, seed=12)]
    lens = [17, 9]
    for make in makers:
        alone = []
        for (q, k, v), L in zip(seqs, lens):
            c = make(1)
            step(c, q[:L], k[:L], v[:L], 0)
            alone.append(step(c, q[L:L + 3], k[L:L + 3], v[L:L + 3], L))
        both = make(2)
        for b, ((q, k, v), L) in enumerate(zip(seqs, lens)):  # fill each row through a one-row view of the batch
            one = make(1)
            step(one, q[:L], k[:L], v[:L], 0)
            for name, axis in type(both).ROWS.items():
                if getattr(one, name) is not None and getattr(both, name) is not None:
                    getattr(both, name).narrow(axis, b, 1).copy_(getattr(one, name))
        pos = torch.stack([torch.arange(L, L + 3) for L in lens])
        both.begin(pos, ROPE)
        stack = lambda i: torch.stack([s[i][L:L + 3] for s, L in zip(seqs, lens)]).transpose(1, 2)  # [B, H, 3, D]
        got = both.attend(0, stack(0), stack(1), stack(2)).transpose(1, 2)
        for b in range(2):
            assert torch.allclose(got[b], alone[b], atol=1e-6), type(both).__name__


def test_bad_retrieval_settings():
    with pytest.raises(ValueError, match="at least one chunk"):
        RetrievalCache(1, H_KV, D, budget=4, chunk_size=8, tail=2)
    with pytest.raises(ValueError, match="tail"):
        RetrievalCache(1, H_KV, D, budget=8, chunk_size=8, tail=0)


# ---- PagedCache -------------------------------------------------------------------------------------------------

def test_paged_cache_equals_full_cache_and_gives_blocks_back():
    """Two rows prefilled apart (each a PagedCache over one pool) then joined, stepping with a rejected speculation:
    every output equals a FullCache holding the same rows, bit for bit; a retrieval selection and a streaming fill
    read through the block table exactly what they read from the FullCache; a row that leaves gives its blocks
    back; the pool grows when short, up to its limit."""
    from retrieval_cache import BlockPool, PagedCache, PoolFull

    layers, bs, c = 2, 4, 8  # (bs != H_KV: a layout mix-up would show)
    pool = BlockPool(layers, H_KV, D, block=bs, n_blocks=3, limit=60)
    seqs, lens = [tokens(40, seed=21), tokens(40, seed=22)], [23, 14]
    full = FullCache(layers, H_KV, D, max_len=64, batch=2)
    paged = None
    for b, ((q, k, v), L) in enumerate(zip(seqs, lens)):
        row = PagedCache(pool, max_len=64)
        step(row, q[:L], k[:L], v[:L], 0, layers)
        one = FullCache(layers, H_KV, D, max_len=64)
        step(one, q[:L], k[:L], v[:L], 0, layers)
        full.k[:, b], full.v[:, b] = one.k[:, 0], one.v[:, 0]
        full.last_q = one.last_q if b == 0 else torch.cat([full.last_q, one.last_q], 1)
        paged = row if paged is None else (paged.join(row) or paged)
    assert pool.n_blocks > 3 and paged.blocks_held == 6 + 4
    pos = torch.stack([torch.arange(L, L + 3) for L in lens])
    stack = lambda i, s: torch.stack([x[i][L + s : L + s + 3] for x, L in zip(seqs, lens)]).transpose(1, 2)
    for cache in (full, paged):  # a rejected speculation of 3 tokens, then the accepted ones at the same positions
        cache.begin(pos, ROPE)
        [cache.attend(layer, stack(0, 5), stack(1, 5), stack(2, 5)) for layer in range(layers)]
        cache.begin(pos, ROPE)
        cache.out = cache.attend(1, stack(0, 0), stack(1, 0), stack(2, 0))
    assert torch.equal(full.out, paged.out) and torch.equal(full.last_q, paged.last_q)
    q_sel = torch.randn(layers, 2, H_Q, D, generator=torch.Generator().manual_seed(4))
    picks = []
    for source in (full, paged):
        rc = RetrievalCache(layers, H_KV, D, budget=24, chunk_size=c, tail=4, batch=2)
        rc.select(source, [L + 3 for L in lens], q_sel)
        sc = StreamingCache(layers, H_KV, D, sinks=2, window=5, max_step=4, batch=2)
        sc.fill_from(source, [L + 3 for L in lens], ROPE)
        seen = rc.valid[..., None]  # gathered slots past a row's end are masked, whatever they hold
        picks.append((rc.chunks, rc.k[:, :, :, :24] * seen, rc.v[:, :, :, :24] * seen, rc.valid, sc.sink_k, sc.ring_k,
                      sc.ring_v, sc.ring_pos))
    assert all(torch.equal(a, b) for a, b in zip(*picks))
    free = len(pool.free)
    paged.keep([1])
    assert len(pool.free) == free + 7 and paged.blocks_held == 5
    with pytest.raises(PoolFull, match="60 blocks at most"):
        pool.take(len(pool.free) + 60)
    with pytest.raises(ValueError, match="must divide the retrieval chunk size"):
        RetrievalCache(layers, H_KV, D, budget=12, chunk_size=1, tail=4).select(paged, [17], q_sel[:, 1:])
