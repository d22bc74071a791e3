"""The tier stack: every mode's greedy output equals ar, sampled output follows the target exactly, and after
every verification each cache holds exactly the accepted prefix."""
import dataclasses
import itertools
import random

import pytest
import torch
from conftest import hf_model, ours, pooled_chisquare, stdlib_text

from retrieval_cache import FullCache, RetrievalCache, StreamingCache, rotate
from triforce_rt.engine import GenerationConfig, Session, generate, generate_batch
from triforce_rt.settings import MODES, SELF_DRAFTING
from triforce_rt.models import ModelConfig
from triforce_rt.models.head import RecurrentHead
from triforce_rt.models.loader import from_state_dict
from triforce_rt.sampling import SamplingParams, probs
from triforce_rt.speculation import HeadTier, Hierarchy, NgramTier, Tokens, verify_sample
from triforce_rt.speculation.auto import Auto

SPEC_MODES = [m for m in MODES if m != "ar"]


def random_pair(seed, n_kv=2, vocab=64, sharpen=1.0):
    """A 2-layer random target and a drafter made of the target's embedding, first layer and head, so the
    drafter agrees often but not always. sharpen scales the final norm, i.e. the logits."""
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=n_kv)
    hf = hf_model(max_position_embeddings=256, seed=seed, **small)
    cfg = ModelConfig.from_hf(hf.config)
    cfg.num_hidden_layers, cfg.max_position_embeddings = 1, 64
    sd = {k: v.clone() for k, v in hf.state_dict().items() if ".layers.1." not in k}
    target, drafter = ours(hf), from_state_dict(cfg, sd).eval().setup_rope()
    with torch.no_grad():
        target.norm.weight.mul_(sharpen)
        drafter.norm.weight.mul_(sharpen)
    return target, drafter


def random_head(target, seed=0, keep=None):
    """A recurrent draft head for target, on its kernels: the target's head rows (of every token, or of keep) and
    final norm (its logits' scale), then random recurrence and features, so that its drafts are sometimes right and
    sometimes not."""
    V, D = target.config.vocab_size, target.config.hidden_size
    head = RecurrentHead(D, V, len(keep or range(V))).initialize(target.head, torch.tensor(keep or range(V)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.norm.copy_(target.norm.weight)
        for w in (head.W.weight, head.U.weight, head.fc1.weight, head.fc2.weight):
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return head.eval().on_kernels_of(target)


def with_head(target, drafter, seed=0):
    """What the modes draft with: the tiny drafter and a recurrent head (each tier builder takes its own kind)."""
    return [drafter, random_head(target, seed)]


def start(target, drafter, ctx, cfg, batch=1):
    """Prefill ctx into `batch` rows of the target's cache and build cfg.mode's tiers, as generate does."""
    return Session(target, [ctx] * batch, [cfg]).tiers(cfg, drafter)


# ---- greedy: token-identical to ar -----------------------------------------------------------------------------

def sweep_cases(n):
    rng = random.Random(0)
    for case in range(n):
        yield dict(seed=case, n_kv=[4, 2, 1][case % 3], prompt_len=rng.randint(12, 150),
                   cfg=dict(budget=rng.choice([4, 8, 16, 40, 4096]), chunk_size=rng.choice([2, 4, 8]),
                            gamma1=rng.randint(1, 4), gamma2=rng.randint(1, 7), refresh=rng.choice([0, 0, 3, 10]),
                            sinks=rng.choice([0, 2, 4]), window=rng.choice([None, 4, 12, 40]),
                            draft_dtype="bfloat16" if case % 4 == 0 else None,
                            draft_quant=["none", "none", "q8", "q4"][case % 4] if case % 4 else "none",
                            head_cutoff=[0.0, 1e-4, 0.02][case // 3 % 3]))  # these models' p are near 1/64:
    # 1e-4 keeps about two of the head's drafts, 0.02 one or none


def mode_config(mode: str, **cfg) -> GenerationConfig:
    """cfg for mode, without a drafting copy where the mode has no tier that drafts with the target's weights."""
    if not set(SELF_DRAFTING) & set(MODES[mode].tiers):
        cfg["draft_quant"] = "none"
    return GenerationConfig(mode=mode, **cfg)


@pytest.mark.parametrize("case", list(sweep_cases(18)), ids=lambda c: f"seed{c['seed']}-kv{c['n_kv']}")
def test_greedy_every_mode_equals_ar(case):
    target, drafter = random_pair(case["seed"], case["n_kv"])
    prompt = torch.randint(0, 64, (case["prompt_len"],), generator=torch.Generator().manual_seed(case["seed"])).tolist()
    cfg = dict(max_new_tokens=40, ignore_eos=True, **case["cfg"])
    if cfg["budget"] < cfg["chunk_size"]:
        cfg["budget"] = cfg["chunk_size"]
    ar = generate(target, prompt, mode_config("ar", **cfg)).tokens
    drafter = with_head(target, drafter, case["seed"])
    for mode in SPEC_MODES + ["redrafter-tree"]:
        beams = {"beams": 2 + case["seed"] % 4} if mode == "redrafter-tree" else {}  # a tree of beams
        res = generate(target, prompt, mode_config(mode.removesuffix("-tree"), **cfg, **beams), drafter=drafter)
        assert res.tokens == ar, mode
        drafting = res.tiers[:-1]
        assert all(t["accepted"] <= t["drafted"] for t in drafting)
        assert res.tiers[-1]["calls"] * (cfg["gamma2"] + 1) >= res.new_tokens - 1


@pytest.mark.parametrize("case", list(sweep_cases(8)), ids=lambda c: f"seed{c['seed']}-kv{c['n_kv']}")
def test_batched_greedy_equals_each_prompt_alone(case):
    """Three prompts of different lengths decode as one batch in every mode; each row's tokens equal ar on its
    prompt alone. An end-of-sequence token that the rows meet at different steps makes rows leave mid-way."""
    target, drafter = random_pair(case["seed"], case["n_kv"])
    g = torch.Generator().manual_seed(case["seed"])
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (case["prompt_len"], 12, 97)]
    cfg = dict(max_new_tokens=40, **case["cfg"])
    cfg["budget"] = max(cfg["budget"], cfg["chunk_size"])
    cfg["window"] = cfg["window"] or 60 - cfg["sinks"]
    free = generate(target, prompts[1], mode_config("ar", ignore_eos=True, **cfg)).tokens
    target.config.eos_token_ids = [free[len(free) // 2]]
    alone = [generate(target, p, mode_config("ar", **cfg)).tokens for p in prompts]
    drafter = with_head(target, drafter, case["seed"])
    for mode in list(MODES) + ["redrafter-tree"]:
        beams = {"beams": 3} if mode == "redrafter-tree" else {}
        got = generate_batch(target, prompts, mode_config(mode.removesuffix("-tree"), **cfg, **beams), drafter=drafter)
        assert [r.tokens for r in got] == alone, mode
        assert all(r.batch_size == 3 for r in got)
    assert len({len(a) for a in alone}) > 1  # the rows did finish at different steps


@pytest.mark.parametrize("case", list(sweep_cases(6)), ids=lambda c: f"seed{c['seed']}-kv{c['n_kv']}")
def test_continuous_batching_equals_each_prompt_alone(case):
    """Seven prompts of different lengths and max_new_tokens, two or three decoding at a time: a row that ends
    (EOS met at different steps, or its own limit) is replaced by the next prompt, prefilled in chunks between
    rounds and joined to the batch's tiers. In every mode each result equals ar on its prompt alone, with the
    target's KV preallocated or paged (blocks of half a chunk); the static schedule too."""
    from triforce_rt import scheduler

    target, drafter = random_pair(case["seed"], case["n_kv"])
    g = torch.Generator().manual_seed(case["seed"])
    lengths = (case["prompt_len"], 12, 97, 40, 150, 21, 64)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]
    cfg = dict(case["cfg"], prefill_chunk=32)
    cfg["budget"] = max(cfg["budget"], cfg["chunk_size"])
    cfg["window"] = cfg["window"] or 60 - cfg["sinks"]
    free = generate(target, prompts[1], mode_config("ar", ignore_eos=True, max_new_tokens=40, **cfg)).tokens
    target.config.eos_token_ids = [free[len(free) // 2]]
    limits = [40, 30, 7, 40, 1, 25, 40]
    alone = [generate(target, p, mode_config("ar", max_new_tokens=n, **cfg)).tokens for p, n in zip(prompts, limits)]
    assert len({len(a) for a in alone}) > 2
    drafter = with_head(target, drafter, case["seed"])
    paged = [(m, 3, "continuous", cfg["chunk_size"] // 2 or 1) for m in MODES]  # KV blocks of half a chunk
    for mode, B, schedule, kv_block in ([(m, 2 + case["seed"] % 2, "continuous", 0) for m in MODES] + paged
                                        + [("self-spec", 3, "static", 0), ("self-spec", 3, "static", 1)]):
        got = {}
        reqs = [scheduler.Request(i, p, mode_config(mode, max_new_tokens=n, **cfg))
                for i, (p, n) in enumerate(zip(prompts, limits))]
        scheduler.run(target, reqs, scheduler.Schedule(B, schedule, kv_block), lambda k, r: got.setdefault(k, r),
                      drafter=drafter)
        assert all(not isinstance(r, Exception) for r in got.values()), (mode, got)
        assert [got[i].tokens for i in range(len(prompts))] == alone, (mode, schedule, kv_block)
        assert 2 <= max(r.batch_size for r in got.values()) <= B  # continuous: a prompt joined a batch decoding


def test_a_full_kv_pool_queues_requests_instead_of_failing_them():
    """Paged KV capped at about two rows' blocks: the next request waits until a row ends (all results equal ar
    alone, never more than two rows at once); a request that alone needs more than the cap gets its error."""
    from triforce_rt import scheduler

    target, _ = random_pair(5)
    c = target.config
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (40, 60, 30, 50, 45, 220)]
    cfg = GenerationConfig(mode="self-spec", max_new_tokens=20, ignore_eos=True, chunk_size=4, budget=8)
    alone = [generate(target, p, cfg).tokens for p in prompts[:5]]
    per_block = 2 * c.num_hidden_layers * c.num_key_value_heads * 4 * c.head_dim * 4  # blocks of 4 fp32 tokens
    cap = (2 * (60 + 20 + cfg.gamma2 + 1) // 4 + 2) * per_block / 2**30  # two of the longest rows
    got = {}
    scheduler.run(target, [scheduler.Request(i, p, cfg) for i, p in enumerate(prompts)],
                  scheduler.Schedule(4, "continuous", 4, cap), lambda k, r: got.setdefault(k, r))
    assert [got[i].tokens for i in range(5)] == alone
    assert max(got[i].batch_size for i in range(5)) == 2
    assert "KV blocks of 4 tokens; the pool holds" in str(got[5])


def test_smollm2_greedy_spec_modes_equal_ar(smol, tiny_drafter):
    """A real 1,600-token prompt; the triforce drafter is a tiny random model with SmolLM2's vocabulary."""
    ids = smol.tokenizer(stdlib_text("textwrap.py")).input_ids[:1600]
    base = dict(max_new_tokens=48, ignore_eos=True, prefill_chunk=512, budget=256, sinks=4, window=56)
    ar = generate(smol, ids, GenerationConfig(**base))
    for mode in ("triforce", "self-spec", "streaming-spec"):
        res = generate(smol, ids, GenerationConfig(mode=mode, **base), drafter=tiny_drafter)
        assert res.tokens == ar.tokens, mode
        retrieval = {t["name"]: t for t in res.tiers}.get("retrieval")
        if retrieval:  # the middle tier is a real drafter on real text: most of its drafts are accepted
            assert retrieval["accepted"] > 0.5 * retrieval["drafted"]


# ---- sampling: exactly the target's distribution ----------------------------------------------------------------

V, DRAWS, ALPHA = 8, 20000, 1e-3
PROMPT = torch.randint(0, V, (24,), generator=torch.Generator().manual_seed(0)).tolist()


def two_token_law(target, sp):
    """Exact P(y1, y2 | PROMPT) of the target, by enumerating y1: [V * V]."""
    ids = torch.tensor([PROMPT + [y] for y in range(V)])
    logits = target(ids, torch.arange(len(PROMPT) + 1).expand(V, -1), target.new_cache(FullCache, 32, batch=V))
    p = probs(logits, sp)  # [V, T, V]
    return (p[0, -2][:, None] * p[:, -1]).flatten()


def resample_from_p(drafts, q, p, generator):
    """TriForce's middle tier: on a rejection it draws from p instead of the residual max(p - q, 0)."""
    return verify_sample(drafts, q, p, generator, resample=lambda p, q: p)


def reduced_vocabulary(drafter, keep: list):
    """The drafter restricted to the tokens `keep` (draft_vocab): its q is 0 for every other token."""
    cfg = dataclasses.replace(drafter.config, draft_vocab=len(keep))
    sd = {k: v.clone() for k, v in drafter.state_dict().items()}
    rest = [t for t in range(cfg.vocab_size) if t not in keep]
    sd["embed_tokens.weight"] = torch.cat([sd["embed_tokens.weight"][keep], sd["embed_tokens.weight"][rest].mean(0)[None]])
    sd["lm_head.weight"] = sd["lm_head.weight"][keep]
    sd["vocab_ids"] = torch.tensor(keep)
    return from_state_dict(cfg, sd).eval().setup_rope()


def sampled_pairs(mode, sp, flawed=False, keep=None, rows=50, kernels=lambda model: None, costs=None,
                  each_round=lambda i: None, **settings):
    """DRAWS times: the first two tokens after PROMPT through the real tiers, `rows` draws per batched step (the
    batch rows are independent sequences); then every tier rolls back. keep: restrict the drafter to these tokens.
    kernels: applied to both models (e.g. models.kernels.use_numba). costs: step costs for --mode auto, whose plan
    is then chosen before every round (Auto, as the engine drives it); each_round(i) runs before round i (a test
    may change the costs there). settings: more GenerationConfig fields (draft_quant). Returns the plan log too."""
    target, drafter = random_pair(3, vocab=V, sharpen=8.0)
    if keep is not None:
        drafter = reduced_vocabulary(drafter, keep)
    kernels(target), kernels(drafter)
    cfg = GenerationConfig(max_new_tokens=16, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, mode=mode,
                           budget=4, chunk_size=2, sinks=2, window=6, gamma1=2, gamma2=3, **settings)
    ctx = PROMPT[:-1]  # the last prompt token stays pending, as after any round
    tiers = start(target, [drafter, random_head(target, keep=keep)], ctx, cfg, batch=rows)
    if flawed:
        tiers[1].verify = resample_from_p
    hierarchy = Hierarchy(tiers, sp, torch.Generator().manual_seed(0), Tokens([PROMPT] * rows, 64))
    auto = costs and Auto(hierarchy, costs, cfg.gamma2, refresh=False)
    counts = torch.zeros(V * V)
    rounds = 0
    for _ in range(DRAWS // rows):
        toks = [[] for _ in range(rows)]
        while min(map(len, toks)) < 2:  # whole rounds (every tier drafts its full γ); a row ahead runs on
            each_round(rounds)
            rounds += 1
            if auto:
                auto.choose(min(map(len, toks)))
                auto.before()
            news, _ = hierarchy.round(len(hierarchy.tiers) - 1, [cfg.max_new_tokens] * rows)
            if auto:
                auto.after(news)
            for t, new in zip(toks, news):
                t += new
        for t in toks:
            counts[t[0] * V + t[1]] += 1
        for b in range(rows):
            hierarchy.rollback(b, len(PROMPT))
    return counts, two_token_law(target, sp), [t.stats for t in tiers[:-1]], auto and auto.log


@pytest.mark.parametrize("mode,sp", [(m, SamplingParams(1.0)) for m in SPEC_MODES]
                         + [("triforce", SamplingParams(0.8, top_p=0.9, top_k=5)), ("redrafter-tree", SamplingParams(1.0)),
                            ("redrafter-tree", SamplingParams(0.8, top_p=0.9, top_k=5))], ids=str)
def test_sampling_follows_the_target_exactly(mode, sp):
    """Every drafting tier, and a tree of 3 beams of 3 tokens (shared prefixes, real rejections) verified by the
    deterministic-candidates rule."""
    counts, law, stats, _ = sampled_pairs(mode.removesuffix("-tree"), sp, **({"beams": 3} if "tree" in mode else {}))
    # Both branches of the rule run many times at every drafting tier: drafts are accepted and rejected.
    # (An n-gram tier proposes continuations of random text, so its acceptance is low, but not zero.)
    assert all(s.accepted >= 200 and s.rejected >= 200 for s in stats), stats
    assert pooled_chisquare(counts, law) > ALPHA


def test_reduced_vocabulary_drafter_stays_exact():
    """q = 0 outside the 5 kept tokens of 8: the residual rule still gives exactly the target's law, through both
    drafting tiers."""
    counts, law, stats, _ = sampled_pairs("triforce", SamplingParams(1.0), keep=[0, 2, 3, 5, 6])
    assert 0.2 < stats[0].accepted / stats[0].drafted < 0.98, stats
    assert pooled_chisquare(counts, law) > ALPHA


def test_reduced_vocabulary_logits_are_minus_infinity_elsewhere():
    _, drafter = random_pair(3, vocab=V)
    small = reduced_vocabulary(drafter, [1, 4, 7])
    ids = [1, 4, 7, 1, 4]  # only kept tokens, so the inputs embed as in the full drafter
    pos = torch.arange(5)[None]
    full = drafter(torch.tensor([ids]), pos, drafter.new_cache(FullCache, 8))[0]
    red = small(torch.tensor([ids]), pos, small.new_cache(FullCache, 8))[0]
    torch.testing.assert_close(red[:, [1, 4, 7]], full[:, [1, 4, 7]])
    assert torch.isinf(red[:, [0, 2, 3, 5, 6]]).all()


def test_triforce_middle_tier_flaw_is_caught():
    counts, law, _, _ = sampled_pairs("triforce", SamplingParams(1.0), flawed=True)
    assert pooled_chisquare(counts, law) < ALPHA


# ---- rollback: every cache holds exactly the accepted prefix ---------------------------------------------------

def layer0_keys(model, tokens, positions):
    """Layer-0 keys of tokens at positions, before and after RoPE: [Hkv, T, D] each. They depend on nothing
    else, so they identify which token a cache slot holds."""
    att = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor([tokens])))
    k = att.k_proj(x).view(1, len(tokens), att.n_kv, att.head_dim).transpose(1, 2)
    cos, sin = model.rope.cos_sin(torch.tensor([positions]))
    return k[0], rotate(k, cos, sin)[0]


def assert_holds_prefix(tier, seq, row=0):
    """Row `row` of tier.cache holds seq[:tier.pos[row]], at the right positions, in every slot a query can see."""
    if isinstance(tier, NgramTier):  # it holds nothing: it reads the hierarchy's buffer
        return
    if isinstance(tier, HeadTier):  # an anchor (if any) is a hidden state of the committed prefix
        assert tier.pos[row] <= len(seq) - 1
        return
    n = tier.pos[row]
    assert n <= len(seq) - 1  # the last token is pending
    c = tier.cache
    if isinstance(c, FullCache):
        torch.testing.assert_close(c.k[0, row, :, :n], layer0_keys(tier.model, seq[:n], list(range(n)))[1])
    elif isinstance(c, RetrievalCache):
        s = int(c.base[row])  # where the tail starts; empty when the tier has fed nothing since its selection
        if n > s:
            torch.testing.assert_close(c.k[0, row, :, c.sel_len : c.sel_len + n - s],
                                       layer0_keys(tier.model, seq[s:n], list(range(s, n)))[1])
    else:
        assert isinstance(c, StreamingCache)
        sinks = list(range(min(c.S, n)))
        window = list(range(max(c.S, n - c.W), n))
        assert c.ring_pos[row, [p % c.R for p in window]].tolist() == window
        torch.testing.assert_close(c.ring_k[0, row][:, [p % c.R for p in window]],
                                   layer0_keys(tier.model, [seq[p] for p in window], window)[1])
        torch.testing.assert_close(c.sink_k[0, row][:, sinks], layer0_keys(tier.model, seq[: len(sinks)], sinks)[0])


@pytest.mark.parametrize("mode", SPEC_MODES + ["redrafter-tree"])
def test_rollback_leaves_exactly_the_accepted_prefix(mode):
    """Three rows decode together; after every round each row's caches hold exactly its own accepted prefix (a
    tree's accepted path moved to its true slots)."""
    target, drafter = random_pair(7, vocab=64, sharpen=20.0)
    prompt = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    # refresh=0 sizes the retrieval tail for every new token: this test refreshes by hand, every 4 rounds.
    cfg = GenerationConfig(max_new_tokens=60, mode=mode.removesuffix("-tree"), budget=16, chunk_size=4, sinks=2,
                           window=10, gamma1=3, gamma2=5, temperature=1.0, refresh=0, beams=4 if "tree" in mode else 1)
    B = 3
    tiers = start(target, with_head(target, drafter), prompt[:-1], cfg, batch=B)
    hierarchy = Hierarchy(tiers, cfg.sampling, torch.Generator().manual_seed(2), Tokens([prompt] * B, 256))
    seqs, rejected = [list(prompt) for _ in range(B)], 0
    for i in range(12):
        if i % 4 == 3:
            hierarchy.refresh()
        news, _ = hierarchy.round(len(tiers) - 1, [60 - i] * B)
        for b, new in enumerate(news):
            rejected += len(new) <= cfg.gamma2
            seqs[b] += new
            assert hierarchy.tok.row(b).tolist() == seqs[b]
            for tier in tiers:
                assert_holds_prefix(tier, seqs[b], b)
            if mode.startswith("redrafter"):  # anchored at the target's hidden state that chose the last token
                head, n = tiers[0], len(seqs[b]) - 1
                assert head.pos[b] == n
                want = target.hidden(torch.tensor([seqs[b][:n]]), torch.arange(n)[None], target.new_cache(FullCache, n))
                torch.testing.assert_close(head.h[b], want[0, -1], rtol=1e-4, atol=1e-4)
    assert len({tuple(s) for s in seqs}) == B  # the rows went their own ways
    assert rejected >= 3


def test_retrieval_budget_covering_the_prompt_is_full_attention():
    """With the whole prompt selected, tier 2 is the target itself: every greedy draft is accepted."""
    target, drafter = random_pair(11)
    prompt = list(itertools.islice(itertools.cycle(range(3, 40)), 70))
    res = generate(target, prompt, GenerationConfig(max_new_tokens=30, ignore_eos=True, mode="self-spec", gamma2=4))
    tier = res.tiers[0]
    assert tier["name"] == "retrieval" and tier["accepted"] == tier["drafted"] > 0


def test_triforce_ngram_drafter_drafts_where_the_lookup_finds_nothing():
    """Row 0 repeats a phrase (the lookup matches), row 1 has no repeated bigram at first (the drafter drafts for it
    instead): both rows are token-identical to ar, and both proposers' drafts reach the retrieval tier."""
    target, drafter = random_pair(5, vocab=64)
    repeat = list(itertools.islice(itertools.cycle(range(3, 20)), 60))
    fresh = list(range(3, 63))  # 60 distinct tokens
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True, mode="triforce-ngram", budget=16, chunk_size=4,
                           sinks=2, window=20, gamma1=3, gamma2=4)
    res = generate_batch(target, [repeat, fresh], cfg, drafter=drafter)
    ar = [generate(target, p, GenerationConfig(max_new_tokens=24, ignore_eos=True)).tokens for p in (repeat, fresh)]
    assert [r.tokens for r in res] == ar
    stats = {t["name"]: t for t in res[0].tiers}
    assert [t["name"] for t in res[0].tiers] == ["drafter", "ngram", "retrieval", "target"]
    assert stats["ngram"]["drafted"] > 0 and stats["drafter"]["drafted"] > 0


def test_one_session_decodes_every_chunk_size_it_was_sized_for():
    """Session: one prefill, sized for several configs (chunk sizes 12 and 8 need a capacity both divide), decodes
    each as generate would, whatever was decoded before."""
    target, drafter = random_pair(0, 2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (50,), generator=g).tolist()
    cfgs = [GenerationConfig(mode=m, max_new_tokens=20, chunk_size=c, budget=24, gamma2=3)
            for m, c in (("self-spec", 12), ("triforce", 8), ("ar", 8))]
    session = Session(target, [ids], cfgs)
    assert session.capacity % 24 == 0
    for cfg in cfgs + cfgs[::-1]:
        assert session.decode(cfg, drafter=drafter)[0].tokens == generate(target, ids, cfg, drafter=drafter).tokens
    with pytest.raises(ValueError, match="not prefilled for these settings"):
        session.decode(GenerationConfig(mode="self-spec", max_new_tokens=20, chunk_size=7))


def test_tree_step_scores_each_node_as_its_own_path():
    """One tree-shaped forward (dynamic tree attention: nodes in scratch slots at position root + depth, each seeing
    the prefix and its ancestors): every node's logits equal a plain forward of the prompt and that node's path, and
    after accept() the cache holds the accepted path's keys and values at their true slots."""
    from triforce_rt.speculation import Tier

    target, _ = random_pair(2, n_kv=2)
    prompt = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    tree = [(5, -1), (9, -1), (7, 0), (3, 0), (11, 1), (2, 2), (5, 4)]  # depths 1 1 2 2 2 3 3; two 5s, two parents
    full = target.new_cache(FullCache, 64)
    target(torch.tensor([prompt[:-1]]), torch.arange(29)[None], full)  # all but the pending token, as after a round
    tier = Tier("target", target, full, pos=[29])
    logits = tier.feed_tree(Tokens([prompt], 64), [tree])
    assert logits.shape[0] == 1 + len(tree)

    def path(i):
        return [] if i < 0 else path(tree[i][1]) + [tree[i][0]]

    def plain(seq):
        cache = target.new_cache(FullCache, 64)
        return target(torch.tensor([seq]), torch.arange(len(seq))[None], cache)[0], cache

    torch.testing.assert_close(logits[0], plain(prompt)[0][-1], rtol=1e-5, atol=1e-5)
    for i in range(len(tree)):
        torch.testing.assert_close(logits[1 + i], plain(prompt + path(i))[0][-1], rtol=1e-5, atol=1e-5)
    tier.accept(0, [1, 4, 6])  # tokens 9, 11, 5 at depths 1-3, from scratch slots 31, 34, 36
    assert tier.pos == [33]
    _, want = plain(prompt + [9, 11, 5])
    torch.testing.assert_close(full.k[:, :, :, :33], want.k[:, :, :, :33], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.v[:, :, :, :33], want.v[:, :, :, :33], rtol=1e-5, atol=1e-5)


def test_tree_verification_takes_the_longest_matching_path():
    """Greedy: descend while a child holds the argmax; emit the argmax where none does."""
    from triforce_rt.speculation.verify import verify_tree

    tree = [(1, -1), (2, -1), (3, 1), (0, 1), (2, 3)]
    p = torch.zeros(1 + len(tree), 4)
    for row, best in enumerate([2, 0, 0, 1, 3, 2]):  # root -> 2 (node 1) -> 0 (node 3) -> 3: no such child
        p[row, best] = 1.0
    assert verify_tree([tree, []], torch.cat([p, p[:1]]), greedy=True) == [([1, 3], 3), ([], 2)]


def head_probability(head, embed, h, pending: int, path: list) -> float:
    """The head's probability of drafting path after pending from the hidden state h [D], step by step over its kept
    tokens (the greedy q)."""
    s, x, prob = None, pending, 1.0
    with torch.no_grad():
        for tok in path:
            s = head.step(embed(torch.tensor([x])), s)
            q = head.reduced_logits(s, h[None]).softmax(-1)[0]
            prob *= float(q[(head.vocab_ids == tok).nonzero()[0, 0]])
            x = tok
    return prob


def test_head_cutoff_keeps_the_drafts_and_tree_nodes_the_head_finds_likely():
    """--head-cutoff c: a greedy chain is the prefix of the uncut chain whose probability under the head is at least
    c; a tree of beams keeps exactly the nodes of the uncut tree whose path is that likely. Rows end up with drafts
    of several lengths (none included), so the cut is exercised, not bypassed."""
    target, _ = random_pair(3, vocab=V, sharpen=8.0)
    head = random_head(target)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (12,), generator=g).tolist() for _ in range(12)]
    hidden = [target.hidden(torch.tensor([p[:-1]]), torch.arange(11)[None], target.new_cache(FullCache, 16))[0, -1]
              for p in prompts]

    def tier(cutoff, width=1):
        t = HeadTier(head, target.embed_tokens, 4, len(prompts), width=width, cutoff=cutoff)
        for b, h in enumerate(hidden):
            t.anchor(b, h, 11)
        return t

    tokens, greedy = Tokens(prompts, 32), SamplingParams(0.0)
    with torch.inference_mode():
        whole, _ = tier(0.0).draft(tokens, 4, greedy, None)
        lengths = set()
        for cutoff in (0.3, 0.05):
            cut, _ = tier(cutoff).draft(tokens, 4, greedy, None)
            for b, (c, w) in enumerate(zip(cut, whole)):
                n = sum(head_probability(head, target.embed_tokens, hidden[b], prompts[b][-1], w[: j + 1]) >= cutoff
                        for j in range(4))
                assert c == w[:n]
                lengths.add(n)
        assert {0, 1, 2} <= lengths, lengths
        full_trees, cut_trees = tier(0.0, 3).tree(tokens, 3, 4), tier(0.05, 3).tree(tokens, 3, 4)
    for b, (full, cut) in enumerate(zip(full_trees, cut_trees)):
        likely = [p for p in node_paths(full)
                  if head_probability(head, target.embed_tokens, hidden[b], prompts[b][-1], p) >= 0.05]
        assert node_paths(cut) == likely
    assert 0 < sum(map(len, cut_trees)) < sum(map(len, full_trees))


def node_paths(tree: list) -> list:
    """Each node's path from the root (its tokens), for a tree [(token, parent)] in breadth-first order."""
    paths = []
    for tok, parent in tree:
        paths.append((paths[parent] if parent >= 0 else []) + [tok])
    return paths


def test_tree_round_takes_the_chain_step_where_no_tree_branches(monkeypatch):
    """With beams and a cutoff, a round whose trees are all single paths runs the tier's chain step (no tree mask,
    the nodes straight into their true slots), the others a tree step; greedy output equals ar either way."""
    from triforce_rt.speculation import Tier

    target, _ = random_pair(3, vocab=V, sharpen=8.0)
    cfg = dict(max_new_tokens=60, ignore_eos=True)
    ar = generate(target, PROMPT, GenerationConfig(**cfg)).tokens
    steps = {"chain": 0, "tree": 0}
    feed, feed_tree = Tier.feed, Tier.feed_tree

    def chain(self, tokens, need):
        steps["chain"] += max(need) > 1  # a chain with drafts (the first round, unanchored, has none)
        return feed(self, tokens, need)

    def tree(self, tokens, trees):
        steps["tree"] += 1
        return feed_tree(self, tokens, trees)

    monkeypatch.setattr(Tier, "feed", chain)
    monkeypatch.setattr(Tier, "feed_tree", tree)
    res = generate(target, PROMPT, GenerationConfig(mode="redrafter", beams=3, gamma2=4, head_cutoff=0.2, **cfg),
                   drafter=random_head(target))
    assert res.tokens == ar
    assert steps["chain"] > 0 and steps["tree"] > 0, steps
