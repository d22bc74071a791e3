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
from .models.head import RecurrentHead
from .models.llama import Transformer
from .models.quant import quantized
from .sampling import sample
from .settings import MODES, GenerationConfig, check_config, gamma_name, uses_retrieval
from .speculation import HeadTier, Hierarchy, NgramTier, Tier, Tokens
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
    batch_size: int = 1  # the most sequences decoded together while this one decoded
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
    for logits in prefill_steps(model, cache, prompts, chunk, progress, positions, on_logits):
        pass
    return logits


def prefill_steps(model, cache, prompts: list, chunk: int, progress: bool = False, positions: list | None = None,
                  on_logits=None):
    """prefill(), one forward per iteration: yields the logits after each row's last token so far [B, V]."""
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
            yield logits[:, -1]


def drafter_of(drafters, kind: type):
    """The drafter of this kind (a Transformer: the tiny drafter; a RecurrentHead) among drafters: one of them, a
    list of them (an experiment running modes of both), or None."""
    return next((d for d in (drafters if isinstance(drafters, (list, tuple)) else [drafters]) if isinstance(d, kind)),
                None)


def drafter_tier(b: "Build", gamma: int) -> Tier:
    """The tiny drafter with a StreamingCache. Its prefill feeds the sinks and the last layers x W prompt
    tokens: with windowed attention nothing earlier reaches the window's keys, so the cache is the same as
    after streaming the whole prompt, and every query sees relative distances < S + W (its trained range)."""
    cfg, prompts, drafter, target = b.cfg, b.prompts, drafter_of(b.drafter, Transformer), b.model
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
    need = b.longest + cfg.max_new_tokens + max_step
    if drafter.rope is None or drafter.rope.max_len < need:  # true positions past its context: only distances matter
        drafter.setup_rope(max(need, drafter.config.max_position_embeddings))
    cache = drafter.new_cache(StreamingCache, S, W, max_step, batch=len(prompts))
    span = drafter.config.num_hidden_layers * W
    positions = [list(range(min(S, len(p)))) + list(range(max(S, len(p) - span), len(p))) for p in prompts]
    prefill(drafter, cache, [[p[i] for i in pos] for p, pos in zip(prompts, positions)], max_step * len(prompts),
            positions=positions)
    return Tier("drafter", drafter, cache, gamma, pos=[len(p) for p in prompts])


def head_tier(b: "Build", gamma: int) -> HeadTier:
    """The recurrent draft head, over the target's own token embedding; its rows start with no anchor (the first
    round's verification anchors them)."""
    head = drafter_of(b.drafter, RecurrentHead)
    if head is None:
        raise UserError(f"mode '{b.cfg.mode}' needs a recurrent draft head (--drafter)")
    if (head.hidden, head.vocab_size) != (b.model.config.hidden_size, b.model.config.vocab_size):
        raise UserError("the draft head was made for another model (its width or vocabulary differs)")
    return HeadTier(head, b.model.embed_tokens, gamma, len(b.prompts), width=b.cfg.beams, cutoff=b.cfg.head_cutoff)


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
    window = streaming_window(b.cfg, b.longest)  # checked against the context by check_fits
    sc = b.model_d.new_cache(StreamingCache, b.cfg.sinks, window, b.depth, batch=len(b.prompts))
    sc.fill_from(b.full, b.lengths, b.model.rope)
    return Tier("streaming", b.model_d, sc, gamma, pos=b.lengths)


BUILDERS = {"drafter": drafter_tier, "head": head_tier, "ngram": ngram_tier, "retrieval": retrieval_tier,
            "streaming": streaming_tier}


def retrieval_budget(cfg: GenerationConfig, prompt_len: int) -> int:
    """cfg.budget capped at the prompt; by default 4096 (TriForce's) but at most 1/8 of the prompt: past that a
    tier-2 step reads nearly as much KV as the target's (measured in benchmarks/results/hierarchy-cpu.md)."""
    c = cfg.chunk_size
    if cfg.budget is None:
        return max(c, min(DEFAULT_BUDGET, prompt_len // 8) // c * c)
    return min(cfg.budget, math.ceil(prompt_len / c) * c)


@dataclass
class Build:
    """What the tier builders share: the target, its prefilled cache and the settings. Caches are sized for
    `longest` prompt tokens (default: the longest of prompts) and cfg.max_new_tokens, so that rows built apart
    with the same sizes can join one batch."""
    model: object
    full: FullCache
    drafter: object
    prompts: list
    cfg: GenerationConfig
    longest: int | None = None

    def __post_init__(self):
        self.lengths = [len(p) for p in self.prompts]
        self.longest = max(self.longest or 0, *self.lengths)
        self.dtype = getattr(torch, self.cfg.draft_dtype) if self.cfg.draft_dtype else None
        # the target's weights for its own drafting tiers: a quantized copy, one in another dtype, or its own
        self.model_d = (quantized(self.model, self.cfg.draft_quant) if self.cfg.draft_quant != "none"
                        else self.model.with_dtype(self.dtype))
        self.depth = self.cfg.gamma1 + self.cfg.gamma2 + 2  # most tokens a tier may hold past the committed sequence
        self.budget = retrieval_budget(self.cfg, self.longest)  # one cache shape: sized by the longest prompt


def build_tiers(model, full, drafter, prompts: list, cfg: GenerationConfig, longest: int | None = None) -> list:
    """The tiers of cfg.mode in hierarchy order (the target last), built after the target's prefill of prompts
    into `full`, their caches sized for `longest` prompt tokens (Build)."""
    if cfg.draft_dtype and model.runtime.weight_stream:
        raise UserError("--draft-dtype cannot be combined with --offload weights: the target's drafting tiers "
                        "share its streamed weights")
    b, kinds = Build(model, full, drafter, prompts, cfg, longest), MODES[cfg.mode].tiers
    tiers = [BUILDERS[kind](b, getattr(cfg, gamma_name(kinds, i))) for i, kind in enumerate(kinds)]
    return tiers + [Tier("target", model, full, pos=b.lengths)]


def eos_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def capacity(prompts: list, cfgs: list) -> int:
    """Slots of the target's cache: the longest prompt, the new tokens and one verification block (a tree's nodes
    with beams), in whole retrieval chunks where a mode reads its chunks (for every chunk size of cfgs)."""
    need = max(map(len, prompts)) + max(c.max_new_tokens + c.gamma2 * c.beams + 1 for c in cfgs)  # beams: a tree
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
        if model.runtime.kv_offload and any(c.beams > 1 for c in cfgs):
            raise UserError("--beams > 1 (tree verification) cannot be combined with --offload kv")
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
    dec = Decoder(model, cfg, drafter, on_token)
    done = dec.join(full, logits, prompts, list(range(len(prompts))), prefill_s)
    while dec.rows:
        done += dec.round()
    return [res for _, res in sorted(done, key=lambda d: d[0])]


@dataclass
class Row:
    """A sequence of a Decoder's batch."""
    key: object  # the caller's name for it (a prompt's index, a batch line's id)
    prompt_tokens: int
    limit: int  # its max_new_tokens
    stop: set  # token ids that end it
    prefill_s: float
    t0: float  # when its first token was chosen
    peak: int  # the most rows decoded together while it decoded
    out: list = field(default_factory=list)
    decode_s: float = 0.0


class Decoder:
    """The generate loop over a batch of rows: each leaves when it ends, and new rows may join between rounds
    (continuous batching). cfg: the settings the rows share; a joining row may bring its own max_new_tokens and
    ignore_eos, no more than cfg.max_new_tokens, since every cache is sized for cfg and `longest` prompt tokens
    (default: the first join's longest prompt) so that rows built apart have the same sizes.
    With no row left the batch is dropped: the next join starts a new one (new tier stats, a new --mode auto)."""

    def __init__(self, model, cfg: GenerationConfig, drafter=None, on_token=None, longest: int | None = None):
        self.model, self.cfg, self.drafter, self.on_token, self.longest = model, cfg, drafter, on_token, longest
        self.gen = torch.Generator(device=model.device).manual_seed(cfg.seed)
        self.eos = eos_ids(model)
        self.rows, self.h, self.auto, self.since_select = [], None, None, 0

    def join(self, full, logits, prompts: list, keys: list, prefill_s: float = 0.0, cfgs: list | None = None) -> list:
        """Add prompts (prefilled into full, logits [B, V] after each) as rows named keys, with their own cfgs
        (default: the decoder's). Returns [(key, GenerationResult)] of rows that end with their first token."""
        cfg, t0 = self.cfg, time.perf_counter()
        if any(c.max_new_tokens > cfg.max_new_tokens for c in cfgs or []):
            raise ValueError("a joining row's max_new_tokens exceeds what the decoder's caches are sized for")
        first = sample(logits, cfg.sampling, self.gen).tolist()
        tiers = build_tiers(self.model, full, self.drafter, prompts, cfg, self.longest)
        self.longest = self.longest or max(map(len, prompts))
        # Each row's sequence: its prompt and the first token; room for the new tokens and the deepest drafts.
        tokens = Tokens([p + [t] for p, t in zip(prompts, first)], full.max_len + cfg.gamma1 + cfg.gamma2 + 2)
        if self.h is None:
            self.h = Hierarchy(tiers, cfg.sampling, self.gen, tokens)
            if MODES[cfg.mode].auto:  # the pool is (retrieval, ngram, target)
                costs = costs_for(tiers[-1], tiers[0], [tokens.row(b) for b in range(len(prompts))], cfg.gamma2,
                                  retrieval_budget(cfg, self.longest))
                self.auto = Auto(self.h, costs, cfg.gamma2, bool(cfg.refresh))
        else:
            self.h.join(tiers, tokens)
        t1 = time.perf_counter()
        peak = len(self.rows) + len(prompts)
        for k, p, c in zip(keys, prompts, cfgs or [cfg] * len(prompts)):
            self.rows.append(Row(k, len(p), c.max_new_tokens, set() if c.ignore_eos else self.eos,
                                 prefill_s + t1 - t0, t1, peak))
        return self.advance([[]] * (len(self.rows) - len(prompts)) + [[t] for t in first])

    def round(self) -> list:
        """One round of the tier stack for every row; returns [(key, GenerationResult)] of the rows that ended."""
        h, auto, cfg = self.h, self.auto, self.cfg
        if auto:
            auto.choose(sum(len(r.out) for r in self.rows))
            auto.before()
        news, _ = h.round(len(h.tiers) - 1, [r.limit - len(r.out) for r in self.rows])
        if auto:
            auto.after(news)
        done = self.advance(news)
        self.since_select += max(map(len, news))
        if self.rows and cfg.refresh and self.since_select >= cfg.refresh:
            self.h.refresh()
            self.since_select = 0
        return done

    def advance(self, news: list) -> list:
        """Emit each row's new tokens; rows that end leave the batch (their results are returned)."""
        going, done = [], []
        for i, (row, new) in enumerate(zip(self.rows, news)):
            row.peak = max(row.peak, len(self.rows))
            (done if self.emit(row, new) else going).append(i)
        results = [(self.rows[i].key, self.result(self.rows[i])) for i in done]
        if done:
            self.h.keep(going)  # (a paged cache gives the rows' blocks back)
        if not going:
            self.h = self.auto = None
            self.since_select = 0
        self.rows = [self.rows[i] for i in going]
        return results

    def emit(self, row: Row, new: list) -> bool:
        """Append new tokens to row; True once its generation is over."""
        for t in new:
            row.out.append(t)
            if self.on_token:
                self.on_token(row.key, t)
            if t in row.stop or len(row.out) == row.limit:
                row.decode_s = time.perf_counter() - row.t0
                return True
        return False

    def result(self, row: Row) -> GenerationResult:
        tok = self.model.tokenizer
        text = tok.decode(row.out, skip_special_tokens=True) if tok else ""
        stats = [asdict(t.stats) for t in self.h.pool]
        plan = list(self.auto.log) if self.auto else [plan_entry(self.cfg)]
        return GenerationResult(self.cfg.mode, row.prompt_tokens, row.out, text, row.prefill_s, row.decode_s, stats,
                                row.peak, plan)
