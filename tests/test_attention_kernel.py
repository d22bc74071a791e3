"""The numba attention kernel (retrieval_cache/cpu_attention.py) against float64, inside a derived error bound that
torch's SDPA meets too; in place over strided views and paged blocks; and what a query may never read."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_cache import BlockPool, FullCache, PagedCache, attend, cpu_attention, rotate, use_kernel
from retrieval_cache.attention import in_place
from retrieval_cache.cpu_attention import MAX_T, _exp, attend_blocks, attend_view

U = 2.0 ** -24  # fp32 unit roundoff
EXP_ULPS = 6  # _exp's relative error, in units of U (test_exp_accuracy)


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def reference(q, k, v, limits):
    """float64 attention [B, Hq, T, D] and the error bound of an fp32 computation of it (any summation order):
    scores within d_i = gamma(D + 2) sum |q k| / sqrt(D) plus U |s_i - max| and the exp's error, so every weight is
    off by a factor within e^(+-delta); normalised weights then move the output by at most (e^(2 delta) - 1)
    max|v_i - out|; the sums of n weighted values and of n weights (rescaled once per tile and span) add
    2 gamma(2 n + 4) max|v|. Only visible keys enter the maxima."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out, bound = torch.empty(B, Hq, T, D, dtype=torch.float64), torch.empty(B, Hq, T)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                n = int(limits[b, t])
                qq, kk, vv = q[b, h, t].double(), k[b, h // G, :n].double(), v[b, h // G, :n].double()
                s = kk @ qq / math.sqrt(D)
                o = torch.softmax(s, 0) @ vv
                delta = (gamma(D + 2) * (kk.abs() @ qq.abs()) / math.sqrt(D) + U * (s - s.max()).abs()).max()
                delta = float(delta) + EXP_ULPS * U * 2
                out[b, h, t] = o
                bound[b, h, t] = (math.expm1(2 * delta) * float((vv - o).abs().max())
                                  + 2 * gamma(2 * n + 4) * float(vv.abs().max()))
    return out, bound


def case(B, Hkv, G, T, D, S, seed, ragged=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, T, D, generator=g) * 2
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    last = [S - 1 - (7 * b % (S // 2 + 1) if ragged else 0) for b in range(B)]  # rows end at different slots
    limits = torch.tensor([[p - T + 2 + t for t in range(T)] for p in last])  # query t sees slots < limits[b, t]
    return q, k, v, limits


SHAPES = [  # B, Hkv, G, T, D, S: GQA folds, one kv head, D of 8 .. 128, one tile, many spans, T up to MAX_T
    (1, 3, 3, 1, 64, 8064), (2, 3, 3, 4, 64, 1500), (3, 2, 2, 7, 16, 300), (1, 1, 4, 2, 8, 65),
    (2, 2, 3, MAX_T, 128, 700), (4, 1, 1, 1, 12, 5), (1, 4, 2, 3, 16, 2049),
]


@pytest.mark.parametrize("B,Hkv,G,T,D,S", SHAPES)
def test_kernel_within_the_fp32_bound_like_sdpa(B, Hkv, G, T, D, S):
    q, k, v, limits = case(B, Hkv, G, T, D, S, seed=B * 1000 + S)
    exact, bound = reference(q, k, v, limits)
    got = attend_view(q, k, v, limits)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(limits, S), enable_gqa=True)
    for out in (got, sdpa):
        err = (out.double() - exact).abs().amax(-1)
        assert (err <= bound).all(), f"error {float(err.max()):.2e} over bound {float(bound.min()):.2e}"


def test_exp_accuracy():
    x = np.linspace(-87, 0, 20001).astype(np.float32)
    got = np.array([_exp(np.float32(a)) for a in x], dtype=np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) <= EXP_ULPS * U


def test_rotate_in_one_call_gives_torch_bits():
    """RoPE on the CPU in fp32 runs as one numba loop (cpu_attention.rotate); it gives torch's form's bits exactly,
    for transposed views (q, k as the layers give them) and contiguous tensors, one token or a prefill chunk, and
    cos, sin broadcast over the first axis."""
    g = torch.Generator().manual_seed(8)
    for B, H, T, D, Bc in ((1, 9, 1, 64, 1), (2, 3, 7, 64, 2), (1, 4, 300, 8, 1), (5, 3, 4, 64, 1)):
        x = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
        cos, sin = torch.randn(Bc, T, D, generator=g), torch.randn(Bc, T, D, generator=g)  # Bc = 1: broadcast
        torch_form = x * cos[:, None] + torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1) * sin[:, None]
        for t in (x, x.contiguous()):
            with torch.inference_mode():
                assert torch.equal(rotate(t, cos, sin), torch_form)


@pytest.mark.parametrize("G,T", [(2, 3), (3, 4)])  # 6 and 12 folded rows: both ways of scoring (DOT_ROWS)
def test_keys_past_a_query_never_count(G, T):
    """Slots past a row's last limit hold NaN (never read); inside it, a slot past one query's limit holds a huge
    value, which would move that query's output far out of its bound."""
    B, Hkv, D, S = 2, 2, 16, 200
    q, k, v, limits = case(B, Hkv, G, T, D, S, seed=5)
    for b in range(B):
        top = int(limits[b].max())
        k[b, :, top:], v[b, :, top:] = float("nan"), float("nan")
        v[b, :, top - 1] = 1e6  # visible to the last query only
    exact, bound = reference(q, k, v, limits)
    err = (attend_view(q, k, v, limits).double() - exact).abs().amax(-1)
    assert err[:, :, :-1].max() <= bound[:, :, :-1].min() and torch.isfinite(err).all()
    assert (err <= bound).all()


def test_paged_blocks_read_in_place_equal_the_contiguous_cache():
    """A pool whose blocks are shuffled, block 16 not dividing the keys: the same keys in the same order, so the
    same bits as the contiguous view."""
    B, Hkv, G, T, D, S, bs = 3, 3, 3, 4, 64, 1000, 16
    q, k, v, limits = case(B, Hkv, G, T, D, S, seed=9)
    nb = -(-S // bs)
    table = torch.randperm(B * nb + 4, generator=torch.Generator().manual_seed(1))[: B * nb].view(B, nb)
    K = torch.full((B * nb + 4, bs, Hkv, D), float("nan"))  # unused blocks: never read
    V = K.clone()
    for b in range(B):
        for j in range(nb):
            n = min(bs, S - j * bs)
            K[table[b, j], :n], V[table[b, j], :n] = (t[b, :, j * bs : j * bs + n].transpose(0, 1) for t in (k, v))
    assert torch.equal(attend_blocks(q, K, V, table, limits), attend_view(q, k, v, limits))


def test_views_read_in_place_or_refused():
    q, k, v, limits = case(2, 2, 2, 2, 16, 100, seed=3)
    big_k, big_v = torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    big_k[:, :, :100], big_v[:, :, :100] = k, v
    assert torch.equal(attend_view(q, big_k[:, :, :100], big_v[:, :, :100], limits), attend_view(q, k, v, limits))
    assert attend_view(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, limits) is None  # slots not rows


def test_which_steps_the_kernel_takes():
    q = torch.zeros(1, 4, MAX_T, 16)
    limits = torch.ones(1, MAX_T, dtype=torch.long)
    try:
        use_kernel("numba")
        assert in_place(q, q, limits) and not in_place(q, q, None)
        assert not in_place(torch.zeros(1, 4, MAX_T + 1, 16), q, limits) and not in_place(q.double(), q, limits)
        assert not in_place(q, q.double(), limits)
        # a step with limits takes the kernel at any length, one row or a batch; a mask alone stays on SDPA
        for B, S in ((1, 5), (1, 300), (2, 50)):
            q, k, v, limits = case(B, 2, 2, 2, 16, S, seed=S)
            kernel = attend_view(q, k, v, limits)
            sdpa = F.scaled_dot_product_attention(q.view(B, 2, 4, 16), k, v, attn_mask=mask_of(limits, S).repeat(
                1, 1, 2, 1)).view(q.shape)  # attend's SDPA call for a short step (GQA folded)
            assert not torch.equal(sdpa, kernel)
            assert torch.equal(attend(q, k, v, mask_of(limits, S), limits), kernel)
            assert torch.equal(attend(q, k, v, mask_of(limits, S)), sdpa)
        use_kernel("sdpa")
        assert not in_place(q, q, limits)
    finally:
        use_kernel("auto")


def mask_of(limits, S):
    return (torch.arange(S)[None, None] < limits[:, :, None])[:, None]  # [B, 1, T, S]


@pytest.mark.parametrize("T", [1, 3])
def test_one_call_step_equals_its_parts(T, monkeypatch):
    """A FullCache's, a PagedCache's and a RetrievalCache's step in one numba call per layer (cpu_attention.Step:
    RoPE, cache writes, the last query and attention), through attend() and on numpy arrays, against the same step
    in parts (rotate, index writes, attend): the same outputs, cache contents and last queries, bit for bit, for
    ragged rows."""
    from retrieval_cache import RetrievalCache, attention, full, paged, retrieval
    from triforce_rt.models import ModelConfig
    from triforce_rt.models.rope import Rope

    L, Hkv, G, D, n = 2, 3, 3, 64, 70
    rope = Rope(ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=L,
                            num_attention_heads=Hkv * G, num_key_value_heads=Hkv, head_dim=D,
                            max_position_embeddings=512))
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, n + 2 * T, h, D, generator=g).transpose(1, 2) for h in (Hkv * G, Hkv, Hkv))  # as
    # projected: [B, T, H, D] rows, viewed [B, H, T, D]
    pos = torch.stack([torch.arange(n, n + T), torch.arange(n - 5, n - 5 + T)])

    def step(cache, i, part, arrays):
        qkv = [t[:, :, part] for t in (q, k, v)]
        if arrays:  # as Fused passes them: [B * T, H * D] rows
            return torch.from_numpy(cache.step(i, *(t.transpose(1, 2).reshape(2 * T, -1).numpy() for t in qkv)))
        return cache.attend(i, *qkv)

    seen = {}
    for way in ("one call", "arrays", "parts"):
        if way == "parts":
            for module, name in ((full, "view_step"), (retrieval, "view_step"), (paged, "paged_step")):
                monkeypatch.setattr(module, name, lambda *a, **k: None)
        for name, cache in (("full", FullCache(L, Hkv, D, 128, batch=2)),
                            ("paged", PagedCache(BlockPool(L, Hkv, D, 8, 4, limit=64), 128, batch=2))):
            with torch.inference_mode():
                cache.begin(torch.arange(n)[None].expand(2, -1), rope)
                [cache.attend(i, q[:, :, :n], k[:, :, :n], v[:, :, :n]) for i in range(L)]
                cache.begin(pos, rope)
                assert (cache.step is None) == (way == "parts")
                out = torch.stack([step(cache, i, slice(n, n + T), way == "arrays") for i in range(L)])
            kv = (cache.k, cache.v) if name == "full" else (cache.pool.k, cache.pool.v)
            seen[way, name] = out, *(t.clone() for t in kv), cache.last_q.clone()
            if name == "full":  # a retrieval tier over it: 4 whole chunks of 8 of rows of 64 and 56, then T tokens
                sel = RetrievalCache(L, Hkv, D, 32, 8, T, batch=2)
                with torch.inference_mode():
                    sel.select(cache, [64, 56])
                    sel.begin(torch.stack([torch.arange(64, 64 + T), torch.arange(56, 56 + T)]), rope)
                    assert (sel.step is None) == (way == "parts")
                    out = torch.stack([step(sel, i, slice(n + T, n + 2 * T), way == "arrays") for i in range(L)])
                seen[way, "retrieval"] = out, sel.k.clone(), sel.v.clone()
    assert attention.kernel() == "numba"
    for name in ("full", "paged", "retrieval"):
        for way in ("one call", "arrays"):
            for a, b in zip(seen[way, name], seen["parts", name]):
                assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 3, MAX_T + 4])
def test_caches_under_both_kernels(T):
    """A FullCache and a PagedCache step (ragged rows) under numba: each other's bits, and within the bound of the
    keys the cache holds, as SDPA's result is. Past MAX_T both caches stay on SDPA."""
    from triforce_rt.models import ModelConfig
    from triforce_rt.models.rope import Rope

    L, Hkv, G, D, n = 2, 2, 2, 16, 90
    rope = Rope(ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_hidden_layers=L,
                            num_attention_heads=Hkv * G, num_key_value_heads=Hkv, head_dim=D,
                            max_position_embeddings=512))
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, h, n + T, D, generator=g) for h in (Hkv * G, Hkv, Hkv))
    pos = torch.stack([torch.arange(n, n + T), torch.arange(n - 5, n - 5 + T)])  # row 1 ends 5 slots earlier
    outs = {}
    for kernel in ("sdpa", "numba"):
        use_kernel(kernel)
        try:
            for name, cache in (("full", FullCache(L, Hkv, D, 128, batch=2)),
                                ("paged", PagedCache(BlockPool(L, Hkv, D, 8, 4, limit=64), 128, batch=2))):
                cache.begin(torch.arange(n)[None].expand(2, -1), rope)
                [cache.attend(i, q[:, :, :n], k[:, :, :n], v[:, :, :n]) for i in range(L)]
                cache.begin(pos, rope)
                step = [t[:, :, n : n + T] for t in (q, k, v)]
                outs[kernel, name] = torch.stack([cache.attend(i, *step) for i in range(L)])
                if name == "full":
                    held = cache.k[0, :, :, : n + T].clone(), cache.v[0, :, :, : n + T].clone()
        finally:
            use_kernel("auto")
    assert torch.equal(outs["numba", "full"], outs["numba", "paged"])
    assert torch.equal(outs["sdpa", "full"], outs["sdpa", "paged"])
    if T > MAX_T:
        assert torch.equal(outs["numba", "full"], outs["sdpa", "full"])
    cos, sin = rope.cos_sin(pos)
    exact, bound = reference(rotate(q[:, :, n : n + T], cos, sin), *held, pos + 1)
    for kernel in ("sdpa", "numba"):
        assert ((outs[kernel, "full"][0].double() - exact).abs().amax(-1) <= bound).all()
