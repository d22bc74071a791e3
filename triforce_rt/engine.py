"""Prefill, the tier stack of each mode, and the generate loop. The autoregressive mode is one tier.

generate() returns tokens, text and per-tier stats; on_token(id) streams each token as it is chosen.
generate_batch() decodes several prompts together: every tier runs one forward per step for the whole batch.
Modes (tiers in hierarchy order, each drafting for the next; "target" is the target model with its FullCache):
  ar              target
  triforce        drafter + StreamingCache -> target + RetrievalCache -> target
  self-spec       target + RetrievalCache -> target
  streaming-spec  target + StreamingCache -> target      (MagicDec's self-speculation)
  draft           drafter + StreamingCache -> target     (classic speculative decoding)
  ngram           n-gram lookup -> target                 (prompt-lookup decoding)
  triforce-ngram  n-gram lookup, else drafter -> target + RetrievalCache -> target
                  (tiers [drafter, ngram, retrieval, target]: the drafter drafts for the rows with no match)
"""
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from offload import KVStream
from retrieval_cache import FullCache, RetrievalCache, StreamingCache

from .errors import UserError
from .sampling import SamplingParams, sample
from .speculation import Hierarchy, NgramTier, Tier
from .speculation.tier import ragged

MODES = ("ar", "triforce", "self-spec", "streaming-spec", "draft", "ngram", "triforce-ngram")
DRAFTER_MODES = ("triforce", "draft", "triforce-ngram")
DEFAULT_BUDGET = 4096  # retrieval tokens when the prompt is long enough (TriForce's setting)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False
    mode: str = "ar"
    prefill_chunk: int = 1024  # tokens per prefill forward: bounds the score matrix to chunk x context
    budget: int | None = None  # retrieval cache tokens, chunk 0 included; None: retrieval_budget()
    chunk_size: int = 8  # retrieval chunk c
    gamma1: int = 4  # drafter (or n-gram, triforce-ngram) tokens per tier-2 verification
    gamma2: int = 6  # tokens per target verification (every speculative mode)
    ngram: int = 3  # longest n-gram the lookup tier matches (down to 2)
    sinks: int = 16  # StreamingLLM attention sinks
    window: int | None = None  # StreamingLLM window; None: drafter context - sinks, budget - sinks for streaming-spec
    refresh: int = 1  # re-select the retrieval cache once N tokens followed the last selection; 0 = never (TriForce)
    draft_dtype: str | None = None  # dtype of the drafting tiers ("bfloat16", ...); None: the target's

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


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


def check_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.context_limit
    if prompt_len == 0:
        raise UserError("the prompt is empty")
    if prompt_len + max_new_tokens > limit:
        why = " (its sliding window, which this runtime does not apply)" if limit < model.config.max_position_embeddings else ""
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {limit} tokens{why}")


def check_config(cfg: GenerationConfig) -> None:
    """Impossible settings, whatever the mode, as one-line errors."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown mode '{cfg.mode}' (available: {', '.join(MODES)})")
    if cfg.max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    for name in ("gamma1", "gamma2", "chunk_size", "prefill_chunk"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.budget is not None and cfg.budget < cfg.chunk_size:
        raise UserError(f"budget ({cfg.budget} tokens) must hold at least one chunk of chunk_size={cfg.chunk_size}")
    if cfg.draft_dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"unknown draft dtype '{cfg.draft_dtype}' (float32, bfloat16 or float16)")
    if cfg.sinks < 0 or (cfg.window is not None and cfg.window < 1) or cfg.refresh < 0:
        raise UserError("need sinks >= 0, window >= 1 and refresh >= 0")
    if cfg.ngram < 2:
        raise UserError(f"ngram must be at least 2 (got {cfg.ngram})")


def prefill(model, cache, prompts: list, chunk: int, progress: bool = False, positions: list | None = None) -> torch.Tensor:
    """Run each row's tokens through model into row b of cache, in forwards of `chunk` tokens (split over the
    rows); returns the logits after each row's last token [B, V]. positions[b]: where row b's tokens sit
    (default 0..len-1). Rows of different lengths are padded by repeating their last token (tier.ragged)."""
    positions = positions or [list(range(len(p))) for p in prompts]
    ids, pos = ragged(prompts, positions, model.embed_tokens.weight.device)
    B, T = ids.shape
    step = max(1, chunk // B)
    lengths = [len(p) for p in prompts]
    with tqdm(total=sum(lengths), desc="prefill", unit="tok", disable=not progress, leave=False) as bar:
        for s in range(0, T, step):
            logits = model(ids[:, s : s + step], pos[:, s : s + step], cache, last_only=True)
            bar.update(sum(min(n, s + step) - min(n, s) for n in lengths))
    return logits[:, -1]


def drafter_tier(drafter, target, prompts: list, cfg: GenerationConfig, max_step: int, gamma: int) -> Tier:
    """The tiny drafter with a StreamingCache. Its prefill feeds the sinks and the last layers x W prompt
    tokens: with windowed attention nothing earlier reaches the window's keys, so the cache is the same as
    after streaming the whole prompt, and every query sees relative distances < S + W (its trained range)."""
    if drafter is None:
        raise UserError(f"mode '{cfg.mode}' needs a drafter model")
    if drafter.config.vocab_size != target.config.vocab_size:
        raise UserError(f"the drafter's vocabulary ({drafter.config.vocab_size}) differs from the target's "
                        f"({target.config.vocab_size}); it must share the target's tokenizer")
    S = cfg.sinks
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


def retrieval_budget(cfg: GenerationConfig, prompt_len: int) -> int:
    """cfg.budget capped at the prompt; by default 4096 (TriForce's) but at most 1/8 of the prompt: past that a
    tier-2 step reads nearly as much KV as the target's (measured in benchmarks/results/hierarchy-cpu.md)."""
    c = cfg.chunk_size
    if cfg.budget is None:
        return max(c, min(DEFAULT_BUDGET, prompt_len // 8) // c * c)
    return min(cfg.budget, math.ceil(prompt_len / c) * c)


def build_tiers(model, full, drafter, prompts: list, cfg: GenerationConfig) -> list:
    """The tiers of cfg.mode in hierarchy order (the target last), built after the target's prefill of prompts
    into `full`."""
    L, B, c = [len(p) for p in prompts], len(prompts), cfg.chunk_size
    dtype = getattr(torch, cfg.draft_dtype) if cfg.draft_dtype else None
    if dtype and model.weight_stream:
        raise UserError("--draft-dtype cannot be combined with --offload weights: the target's drafting tiers "
                        "share its streamed weights")
    model_d = model.with_dtype(dtype)  # the target's weights for its own drafting tiers
    depth = cfg.gamma1 + cfg.gamma2 + 2  # most tokens a tier may hold past the committed sequence
    budget = retrieval_budget(cfg, max(L))  # one cache shape for the batch: sized by the longest prompt
    tiers = []
    if cfg.mode in DRAFTER_MODES:
        gamma = cfg.gamma2 if cfg.mode == "draft" else cfg.gamma1
        tiers.append(drafter_tier(drafter and drafter.with_dtype(dtype), model, prompts, cfg, max(depth, 64), gamma))
    if cfg.mode in ("ngram", "triforce-ngram"):  # in triforce-ngram the drafter below it drafts when it has no match
        gamma = cfg.gamma2 if cfg.mode == "ngram" else cfg.gamma1
        tiers.append(NgramTier(model.config.vocab_size, gamma, full.max_len, max_n=cfg.ngram, batch=B))
    if cfg.mode in ("triforce", "triforce-ngram", "self-spec"):
        # Selected from the full cache, scored with the last prompt token's query; the tail holds what follows.
        tail = (cfg.refresh or cfg.max_new_tokens) + 2 * depth
        rc = model_d.new_cache(RetrievalCache, budget, c, tail, batch=B)
        rc.select(full, L)
        tiers.append(Tier("retrieval", model_d, rc, cfg.gamma2, pos=L))
    if cfg.mode == "streaming-spec":
        sc = model_d.new_cache(StreamingCache, cfg.sinks, cfg.window or max(1, budget - cfg.sinks), depth, batch=B)
        sc.fill_from(full, L, model.rope)
        tiers.append(Tier("streaming", model_d, sc, cfg.gamma2, pos=L))
    return tiers + [Tier("target", model, full, pos=L)]


def eos_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


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
    check_config(cfg)
    for ids in prompts:
        check_fits(model, len(ids), cfg.max_new_tokens)
    # Room for the longest prompt, the new tokens and one verification block, in whole retrieval chunks.
    longest = max(len(p) for p in prompts)
    capacity = math.ceil((longest + cfg.max_new_tokens + cfg.gamma2 + 1) / cfg.chunk_size) * cfg.chunk_size
    if model.kv_offload and len(prompts) > 1:
        raise UserError("a KV cache offloaded to host memory decodes one sequence at a time (use --batch-size 1)")
    t0 = time.perf_counter()
    full = model.new_cache(FullCache, capacity, batch=len(prompts), store=KVStream if model.kv_offload else None)
    logits = prefill(model, full, prompts, cfg.prefill_chunk, progress)
    return decode(model, full, logits, prompts, cfg, on_token, drafter, time.perf_counter() - t0)


def decode(model, full, logits, prompts: list, cfg: GenerationConfig, on_token=None, drafter=None,
           prefill_s: float = 0.0) -> list:
    """The generate loop after the target's prefill: row b of full holds prompts[b], logits [B, V] follow them.
    A row that finishes (EOS or max_new_tokens) leaves the batch; the others go on."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(cfg.seed)
    sp, stop = cfg.sampling, (set() if cfg.ignore_eos else eos_ids(model))
    t0 = time.perf_counter()
    first = sample(logits, sp, gen).tolist()
    tiers = build_tiers(model, full, drafter, prompts, cfg)
    prefill_s += time.perf_counter() - t0

    hierarchy, top = Hierarchy(tiers, sp, gen), len(tiers) - 1
    seqs, outs = [list(p) for p in prompts], [[] for _ in prompts]
    decode_s = [0.0] * len(prompts)

    def emit(row: int, new: list) -> bool:  # True once the row's generation is over
        for t in new:
            seqs[row].append(t)
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
        news, _ = hierarchy.round(top, [seqs[r] for r in live], [cfg.max_new_tokens - len(outs[r]) for r in live])
        advance(news)
        since_select += max(map(len, news))
        if live and cfg.refresh and since_select >= cfg.refresh:
            hierarchy.refresh()
            since_select = 0
    stats = [asdict(t.stats) for t in tiers]
    decode_text = (lambda o: model.tokenizer.decode(o, skip_special_tokens=True)) if model.tokenizer else (lambda o: "")
    return [GenerationResult(cfg.mode, len(p), o, decode_text(o), prefill_s, s, stats, len(prompts))
            for p, o, s in zip(prompts, outs, decode_s)]
