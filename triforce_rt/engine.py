"""Prefill, the tier stack of each mode, and the generate loop. The autoregressive mode is one tier.

Session prefills the prompts once into the target's cache; Session.decode(cfg) runs the generate loop from there,
as often as asked (each decode starts from the prefill's state). generate() and generate_batch() are one session
decoded once. The modes and their tiers are the table settings.MODES; build_tiers() makes them with one builder
per tier kind. For --mode auto they are a pool, and speculation/auto.py chooses before each round which of them
draft. A result holds tokens, text, per-tier stats and the plan; on_token(row, id) streams each token as it is
chosen.
"""
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from offload import KVStream
from retrieval_cache import FullCache, RetrievalCache, StreamingCache

from .calibration import costs_for
from .errors import UserError
from .models.quant import quantized
from .sampling import sample
from .settings import MODES, GenerationConfig, check_config, gamma_name, uses_retrieval
from .speculation import Hierarchy, NgramTier, Tier, Tokens
from .speculation.auto import Auto
from .speculation.tier import ragged

DEFAULT_BUDGET = 4096  # retrieval tokens when the prompt is long enough (TriForce's setting)


@dataclass
class GenerationResult:
    mode: str
    prompt_tokens: int
    tokens: list
    text: str
    prefill_seconds: float
    decode_seconds: float  # from the first token to this sequence's last
    tiers: list = field(default_factory=list)  # per-tier stats (shared by the sequences decoded as one batch)
    batch_size: int = 1  # sequences decoded together
    plan: list = field(default_factory=list)  # the tiers drafting, then each switch of --mode auto (plan_entry)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes from the prefill logits; decode time covers the rest.
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """Decode tokens per target forward: accepted drafts + the target's own token (1.0 for ar)."""
        calls = self.tiers[-1]["calls"] if self.tiers else 0
        return (self.new_tokens - 1) / calls if calls else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, decode_tokens_per_second=self.decode_tokens_per_second,
                 tokens_per_target_call=self.tokens_per_target_call)
        return d


def check_fits(model, prompt_len: int, cfg: GenerationConfig) -> None:
    """A prompt of prompt_len tokens and cfg's new tokens fit the model, and so does a retrieval chunk."""
    limit = model.config.context_limit
    if prompt_len == 0:
        raise UserError("the prompt is empty")
    if prompt_len + cfg.max_new_tokens > limit:
        why = " (its sliding window, which this runtime does not apply)" if limit < model.config.max_position_embeddings else ""
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                        f"context of {limit} tokens{why}")
    if MODES[cfg.mode].tiers and cfg.gamma1 + cfg.gamma2 > limit:  # drafts past the context would be sized for
        raise UserError(f"gamma1 + gamma2 ({cfg.gamma1 + cfg.gamma2}) exceed the model's context of {limit} tokens")
    if uses_retrieval(cfg.mode) and cfg.chunk_size > limit:  # the cache holds whole chunks
        raise UserError(f"chunk_size ({cfg.chunk_size}) exceeds the model's context of {limit} tokens")
    if "streaming" in MODES[cfg.mode].tiers and cfg.sinks + streaming_window(cfg, prompt_len) > limit:
        raise UserError(f"sinks + window ({cfg.sinks + streaming_window(cfg, prompt_len)}) exceed the model's "
                        f"context of {limit} tokens")


def prefill(model, cache, prompts: list, chunk: int, progress: bool = False, positions: list | None = None,
            on_logits=None) -> torch.Tensor:
    """Run each row's tokens through model into row b of cache, in forwards of `chunk` tokens (split over the
    rows); returns the logits after each row's last token [B, V]. positions[b]: where row b's tokens sit
    (default 0..len-1). Rows of different lengths are padded by repeating their last token (tier.ragged).
    on_logits(logits [B, t, V]): every position's logits, forward by forward (distillation labels them)."""
    positions = positions or [list(range(len(p))) for p in prompts]
    ids, pos = ragged(prompts, positions, model.device)
    B, T = ids.shape
    step = max(1, chunk // B)
    lengths = [len(p) for p in prompts]
    with tqdm(total=sum(lengths), desc="prefill", unit="tok", disable=not progress, leave=False) as bar:
        for s in range(0, T, step):
            logits = model(ids[:, s : s + step], pos[:, s : s + step], cache, last_only=on_logits is None)
            if on_logits:
                on_logits(logits)
            bar.update(sum(min(n, s + step) - min(n, s) for n in lengths))
    return logits[:, -1]


def drafter_tier(b: "Build", gamma: int) -> Tier:
    """The tiny drafter with a StreamingCache. Its prefill feeds the sinks and the last layers x W prompt
    tokens: with windowed attention nothing earlier reaches the window's keys, so the cache is the same as
    after streaming the whole prompt, and every query sees relative distances < S + W (its trained range)."""
    cfg, prompts, drafter, target = b.cfg, b.prompts, b.drafter, b.model
    if drafter is None:
        raise UserError(f"mode '{cfg.mode}' needs a drafter model")
    if drafter.config.vocab_size != target.config.vocab_size:
        raise UserError(f"the drafter's vocabulary ({drafter.config.vocab_size}) differs from the target's "
                        f"({target.config.vocab_size}); it must share the target's tokenizer")
    drafter = drafter.with_dtype(b.dtype)
    S, max_step = cfg.sinks, max(b.depth, 64)
    W = cfg.window or max(1, drafter.config.max_position_embeddings - S)  # the window its training records had
    if S + W > drafter.config.max_position_embeddings:
        raise UserError(f"sinks + window ({S + W}) exceed the drafter's context ({drafter.config.max_position_embeddings})")
    need = max(len(p) for p in prompts) + cfg.max_new_tokens + max_step
    if drafter.rope is None or drafter.rope.max_len < need:  # true positions past its context: only distances matter
        drafter.setup_rope(max(need, drafter.config.max_position_embeddings))
    cache = drafter.new_cache(StreamingCache, S, W, max_step, batch=len(prompts))
    span = drafter.config.num_hidden_layers * W
    positions = [list(range(min(S, len(p)))) + list(range(max(S, len(p) - span), len(p))) for p in prompts]
    prefill(drafter, cache, [[p[i] for i in pos] for p, pos in zip(prompts, positions)], max_step * len(prompts),
            positions=positions)
    return Tier("drafter", drafter, cache, gamma, pos=[len(p) for p in prompts])


def ngram_tier(b: "Build", gamma: int) -> NgramTier:
    return NgramTier(b.model.config.vocab_size, gamma, max_n=b.cfg.ngram)


def retrieval_tier(b: "Build", gamma: int) -> Tier:
    """Selected from the full cache, scored with the last prompt token's query; the tail holds what follows."""
    tail = min(b.cfg.refresh or b.cfg.max_new_tokens, b.cfg.max_new_tokens) + 2 * b.depth
    rc = b.model_d.new_cache(RetrievalCache, b.budget, b.cfg.chunk_size, tail, batch=len(b.prompts))
    rc.select(b.full, b.lengths)
    return Tier("retrieval", b.model_d, rc, gamma, pos=b.lengths)


def streaming_window(cfg: GenerationConfig, prompt_len: int) -> int:
    """streaming-spec's window: cfg.window, else the retrieval budget's tokens after the sinks (as much KV)."""
    return cfg.window or max(1, retrieval_budget(cfg, prompt_len) - cfg.sinks)


def streaming_tier(b: "Build", gamma: int) -> Tier:
    window = streaming_window(b.cfg, max(b.lengths))  # checked against the context by check_fits
    sc = b.model_d.new_cache(StreamingCache, b.cfg.sinks, window, b.depth, batch=len(b.prompts))
    sc.fill_from(b.full, b.lengths, b.model.rope)
    return Tier("streaming", b.model_d, sc, gamma, pos=b.lengths)


BUILDERS = {"drafter": drafter_tier, "ngram": ngram_tier, "retrieval": retrieval_tier, "streaming": streaming_tier}


def retrieval_budget(cfg: GenerationConfig, prompt_len: int) -> int:
    """cfg.budget capped at the prompt; by default 4096 (TriForce's) but at most 1/8 of the prompt: past that a
    tier-2 step reads nearly as much KV as the target's (measured in benchmarks/results/hierarchy-cpu.md)."""
    c = cfg.chunk_size
    if cfg.budget is None:
        return max(c, min(DEFAULT_BUDGET, prompt_len // 8) // c * c)
    return min(cfg.budget, math.ceil(prompt_len / c) * c)


@dataclass
class Build:
    """What the tier builders share: the target, its prefilled cache and the settings."""
    model: object
    full: FullCache
    drafter: object
    prompts: list
    cfg: GenerationConfig

    def __post_init__(self):
        self.lengths = [len(p) for p in self.prompts]
        self.dtype = getattr(torch, self.cfg.draft_dtype) if self.cfg.draft_dtype else None
        # the target's weights for its own drafting tiers: a quantized copy, one in another dtype, or its own
        self.model_d = (quantized(self.model, self.cfg.draft_quant) if self.cfg.draft_quant != "none"
                        else self.model.with_dtype(self.dtype))
        self.depth = self.cfg.gamma1 + self.cfg.gamma2 + 2  # most tokens a tier may hold past the committed sequence
        self.budget = retrieval_budget(self.cfg, max(self.lengths))  # one cache shape: sized by the longest prompt


def build_tiers(model, full, drafter, prompts: list, cfg: GenerationConfig) -> list:
    """The tiers of cfg.mode in hierarchy order (the target last), built after the target's prefill of prompts
    into `full`."""
    if cfg.draft_dtype and model.runtime.weight_stream:
        raise UserError("--draft-dtype cannot be combined with --offload weights: the target's drafting tiers "
                        "share its streamed weights")
    b, kinds = Build(model, full, drafter, prompts, cfg), MODES[cfg.mode].tiers
    tiers = [BUILDERS[kind](b, getattr(cfg, gamma_name(kinds, i))) for i, kind in enumerate(kinds)]
    return tiers + [Tier("target", model, full, pos=b.lengths)]


def eos_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def capacity(prompts: list, cfgs: list) -> int:
    """Slots of the target's cache: the longest prompt, the new tokens and one verification block, in whole
    retrieval chunks where a mode reads its chunks (for every chunk size of cfgs)."""
    need = max(map(len, prompts)) + max(c.max_new_tokens + c.gamma2 + 1 for c in cfgs)
    unit = math.lcm(*[c.chunk_size for c in cfgs if uses_retrieval(c.mode)], 1)
    return math.ceil(need / unit) * unit


class Session:
    """One prefill of the prompts (row b of the target's cache holds prompts[b]), sized for every config in cfgs;
    decode(cfg) runs the generate loop from it, as often as asked, each time from the prefill's state."""

    def __init__(self, model, prompts: list, cfgs: list, progress: bool = False):
        for cfg in cfgs:
            check_config(cfg)
            for ids in prompts:
                check_fits(model, len(ids), cfg)
            if cfg.draft_quant != "none":  # made (or refused) before the prefill's time is spent
                quantized(model, cfg.draft_quant)
        if model.runtime.kv_offload and len(prompts) > 1:
            raise UserError("a KV cache offloaded to host memory decodes one sequence at a time (use --batch-size 1)")
        self.model, self.prompts, self.capacity = model, prompts, capacity(prompts, cfgs)
        t0 = time.perf_counter()
        store = KVStream if model.runtime.kv_offload else None
        self.full = model.new_cache(FullCache, self.capacity, batch=len(prompts), store=store)
        self.logits = prefill(model, self.full, prompts, cfgs[0].prefill_chunk, progress)
        self.prefill_s = time.perf_counter() - t0
        # Slots past the prompts are invisible until rewritten (caches are addressed by position), so the prefill's
        # state is the cache's tensors (a row that finishes early leaves the batch: keep() replaces them) and the
        # last prompt tokens' query.
        self.state = (self.full.k, self.full.v, self.full.last_q.clone())

    def restore(self, cfg: GenerationConfig) -> None:
        if capacity(self.prompts, [cfg]) > self.capacity or (uses_retrieval(cfg.mode) and self.capacity % cfg.chunk_size):
            raise ValueError("this session was not prefilled for these settings (pass them to Session)")
        self.full.k, self.full.v, q = self.state
        self.full.last_q = q.clone()

    def tiers(self, cfg: GenerationConfig, drafter=None) -> list:
        """cfg.mode's tiers over the prefill (for tests that step the hierarchy themselves)."""
        self.restore(cfg)
        return build_tiers(self.model, self.full, drafter, self.prompts, cfg)

    def decode(self, cfg: GenerationConfig, on_token=None, drafter=None) -> list:
        """Each prompt's GenerationResult; on_token(row, id) streams."""
        self.restore(cfg)
        return decode(self.model, self.full, self.logits, self.prompts, cfg, on_token, drafter, self.prefill_s)


def generate(model, prompt_ids: list, cfg: GenerationConfig, on_token=None, progress: bool = False,
             drafter=None) -> GenerationResult:
    """Decode up to cfg.max_new_tokens after prompt_ids. on_token(id) streams each token as it is chosen;
    progress: a prefill bar on stderr. drafter: the tiny model of the drafter modes (same vocabulary as model)."""
    stream = on_token and (lambda row, t: on_token(t))
    return generate_batch(model, [prompt_ids], cfg, stream, progress, drafter)[0]


def generate_batch(model, prompts: list, cfg: GenerationConfig, on_token=None, progress: bool = False,
                   drafter=None) -> list:
    """Decode the prompts together, one batched forward per tier step (prompts may differ in length);
    on_token(row, id). Each result is what generate() would return for its prompt alone, up to sampling
    randomness: greedy tokens are identical."""
    return Session(model, prompts, [cfg], progress).decode(cfg, on_token, drafter)


def plan_entry(cfg: GenerationConfig) -> dict:
    """A fixed mode's plan: its name and the γ it reads."""
    names = {gamma_name(MODES[cfg.mode].tiers, i) for i in range(len(MODES[cfg.mode].tiers))}
    return {"at": 0, "mode": cfg.mode, **{g: getattr(cfg, g) for g in sorted(names)}}


def decode(model, full, logits, prompts: list, cfg: GenerationConfig, on_token=None, drafter=None,
           prefill_s: float = 0.0) -> list:
    """The generate loop after the target's prefill: row b of full holds prompts[b], logits [B, V] follow them.
    A row that finishes (EOS or max_new_tokens) leaves the batch; the others go on."""
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
    sp, stop = cfg.sampling, (set() if cfg.ignore_eos else eos_ids(model))
    t0 = time.perf_counter()
    first = sample(logits, sp, gen).tolist()
    tiers = build_tiers(model, full, drafter, prompts, cfg)
    # Each row's sequence: its prompt and the first token; room for the new tokens and the deepest drafts.
    tokens = Tokens([p + [t] for p, t in zip(prompts, first)], full.max_len + cfg.gamma1 + cfg.gamma2 + 2)
    hierarchy = Hierarchy(tiers, sp, gen, tokens)
    auto = None
    if MODES[cfg.mode].auto:  # the pool is (retrieval, ngram, target)
        costs = costs_for(tiers[-1], tiers[0], [tokens.row(b) for b in range(len(prompts))], cfg.gamma2,
                          retrieval_budget(cfg, max(map(len, prompts))))
        auto = Auto(hierarchy, costs, cfg.gamma2, bool(cfg.refresh))
    prefill_s += time.perf_counter() - t0
    outs, decode_s = [[] for _ in prompts], [0.0] * len(prompts)

    def emit(row: int, new: list) -> bool:  # True once the row's generation is over
        for t in new:
            outs[row].append(t)
            if on_token:
                on_token(row, t)
            if t in stop or len(outs[row]) == cfg.max_new_tokens:
                decode_s[row] = time.perf_counter() - t0
                return True
        return False

    live = list(range(len(prompts)))  # the prompt of each batch row

    def advance(news: list) -> None:  # emit each row's new tokens; finished rows leave the batch
        nonlocal live
        going = [i for i, (row, new) in enumerate(zip(live, news)) if not emit(row, new)]
        if going and len(going) < len(live):
            hierarchy.keep(going)
        live = [live[i] for i in going]

    t0 = time.perf_counter()
    advance([[t] for t in first])
    since_select = 0
    while live:
        if auto:
            auto.choose(sum(map(len, outs)))
            auto.before()
        news, _ = hierarchy.round(len(hierarchy.tiers) - 1, [cfg.max_new_tokens - len(outs[r]) for r in live])
        if auto:
            auto.after(news)
        advance(news)
        since_select += max(map(len, news))
        if live and cfg.refresh and since_select >= cfg.refresh:
            hierarchy.refresh()
            since_select = 0
    stats = [asdict(t.stats) for t in tiers]
    decode_text = (lambda o: model.tokenizer.decode(o, skip_special_tokens=True)) if model.tokenizer else (lambda o: "")
    plan = auto.log if auto else [plan_entry(cfg)]
    return [GenerationResult(cfg.mode, len(p), o, decode_text(o), prefill_s, s, stats, len(prompts), plan)
            for p, o, s in zip(prompts, outs, decode_s)]
