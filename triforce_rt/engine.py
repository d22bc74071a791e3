"""Prefill, the tier stack of each mode, and the generate loop. The autoregressive mode is one tier.

generate() returns tokens, text and per-tier stats; on_token(id) streams each token as it is chosen.
Modes (tiers cheapest first; "target" is the target model with its FullCache):
  ar              target
  triforce        drafter + StreamingCache -> target + RetrievalCache -> target
  self-spec       target + RetrievalCache -> target
  streaming-spec  target + StreamingCache -> target      (MagicDec's self-speculation)
  draft           drafter + StreamingCache -> target     (classic speculative decoding)
  ngram           n-gram lookup -> target                 (prompt-lookup decoding)
  triforce-ngram  n-gram lookup -> drafter -> target + RetrievalCache -> target
"""
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from retrieval_cache import FullCache, RetrievalCache, StreamingCache

from .errors import UserError
from .sampling import SamplingParams, sample
from .speculation import Hierarchy, NgramTier, Tier

MODES = ("ar", "triforce", "self-spec", "streaming-spec", "draft", "ngram", "triforce-ngram")
DRAFTER_MODES = ("triforce", "draft", "triforce-ngram")
DEFAULT_BUDGET = 4096  # retrieval tokens when the prompt is long enough (TriForce's setting)
DRAFTER_WINDOW = 240  # with 16 sinks: TriForce's 256-token StreamingLLM cache for its tiny drafter


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
    gamma1: int = 4  # drafter tokens per tier-2 verification (triforce); n-gram tokens per drafter step (triforce-ngram)
    gamma2: int = 6  # tokens per target verification (every speculative mode)
    ngram: int = 3  # longest n-gram the lookup tier matches (down to 2)
    sinks: int = 16  # StreamingLLM attention sinks
    window: int | None = None  # StreamingLLM window; None: 240 for a drafter, budget - sinks for streaming-spec
    refresh: int = 0  # re-select the retrieval cache every N generated tokens; 0 = never (TriForce)
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
    decode_seconds: float
    tiers: list = field(default_factory=list)

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


def prefill(model, cache, ids: torch.Tensor, chunk: int, progress: bool = False, positions=None) -> torch.Tensor:
    """Run ids [B, L] through model into cache in chunks of `chunk` tokens; returns last logits [B, V].
    positions [L]: where the tokens sit (default: contiguous after cache.length)."""
    B, L = ids.shape
    if positions is None:
        positions = torch.arange(cache.length, cache.length + L, device=ids.device)
    with tqdm(total=L, desc="prefill", unit="tok", disable=not progress, leave=False) as bar:
        for s in range(0, L, chunk):
            logits = model(ids[:, s : s + chunk], positions[s : s + chunk].expand(B, -1), cache, last_only=True)
            bar.update(min(chunk, L - s))
    return logits[:, -1]


def drafter_tier(drafter, target, prompt_ids: list, cfg: GenerationConfig, max_step: int, gamma: int) -> Tier:
    """The tiny drafter with a StreamingCache. Its prefill feeds the sinks and the last layers x W prompt
    tokens: with windowed attention nothing earlier reaches the window's keys, so the cache is the same as
    after streaming the whole prompt, and every query sees relative distances < S + W (its trained range)."""
    if drafter is None:
        raise UserError(f"mode '{cfg.mode}' needs a drafter model")
    if drafter.config.vocab_size != target.config.vocab_size:
        raise UserError(f"the drafter's vocabulary ({drafter.config.vocab_size}) differs from the target's "
                        f"({target.config.vocab_size}); it must share the target's tokenizer")
    S, W = cfg.sinks, cfg.window or DRAFTER_WINDOW
    if S + W > drafter.config.max_position_embeddings:
        raise UserError(f"sinks + window ({S + W}) exceed the drafter's context ({drafter.config.max_position_embeddings})")
    L = len(prompt_ids)
    need = L + cfg.max_new_tokens + max_step
    if drafter.rope is None or drafter.rope.max_len < need:  # true positions past its context: only distances matter
        drafter.setup_rope(max(need, drafter.config.max_position_embeddings))
    cache = drafter.new_cache(StreamingCache, S, W, max_step)
    device = drafter.embed_tokens.weight.device
    pos = torch.cat([torch.arange(min(S, L)), torch.arange(max(S, L - drafter.config.num_hidden_layers * W), L)])
    prefill(drafter, cache, torch.tensor([prompt_ids], device=device)[:, pos], max_step, positions=pos.to(device))
    return Tier("drafter", drafter, cache, gamma, pos=L)


def retrieval_budget(cfg: GenerationConfig, prompt_len: int) -> int:
    """cfg.budget capped at the prompt; by default 4096 (TriForce's) but at most 1/8 of the prompt: past that a
    tier-2 step reads nearly as much KV as the target's (measured in benchmarks/results/hierarchy-cpu.md)."""
    c = cfg.chunk_size
    if cfg.budget is None:
        return max(c, min(DEFAULT_BUDGET, prompt_len // 8) // c * c)
    return min(cfg.budget, math.ceil(prompt_len / c) * c)


def build_tiers(model, full, drafter, prompt_ids: list, cfg: GenerationConfig) -> list:
    """The tiers of cfg.mode, cheapest first, built after the target's prefill into `full`."""
    L, c = len(prompt_ids), cfg.chunk_size
    dtype = getattr(torch, cfg.draft_dtype) if cfg.draft_dtype else None
    model_d = model.with_dtype(dtype)  # the target's weights for its own drafting tiers
    depth = cfg.gamma1 + cfg.gamma2 + 2  # most tokens a tier may hold past the committed sequence
    budget = retrieval_budget(cfg, L)
    tiers = []
    if cfg.mode in ("ngram", "triforce-ngram"):
        gamma = cfg.gamma2 if cfg.mode == "ngram" else cfg.gamma1
        tiers.append(NgramTier(model.config.vocab_size, gamma, full.max_len, max_n=cfg.ngram))
    if cfg.mode in DRAFTER_MODES:
        gamma = cfg.gamma2 if cfg.mode == "draft" else cfg.gamma1
        tiers.append(drafter_tier(drafter and drafter.with_dtype(dtype), model, prompt_ids, cfg, max(depth, 64), gamma))
    if cfg.mode in ("triforce", "triforce-ngram", "self-spec"):
        # Selected from the full cache, scored with the last prompt token's query; the tail holds what follows.
        tail = (cfg.refresh or cfg.max_new_tokens) + 2 * depth
        rc = model_d.new_cache(RetrievalCache, budget, c, tail)
        rc.select(full)
        tiers.append(Tier("retrieval", model_d, rc, cfg.gamma2, pos=L))
    if cfg.mode == "streaming-spec":
        sc = model_d.new_cache(StreamingCache, cfg.sinks, cfg.window or max(1, budget - cfg.sinks), depth)
        sc.fill_from(full, model.rope)
        tiers.append(Tier("streaming", model_d, sc, cfg.gamma2, pos=L))
    return tiers + [Tier("target", model, full, pos=L)]


def eos_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def generate(model, prompt_ids: list, cfg: GenerationConfig, on_token=None, progress: bool = False,
             drafter=None) -> GenerationResult:
    """Decode up to cfg.max_new_tokens after prompt_ids (batch 1). progress: a prefill bar on stderr.
    drafter: the tiny model of the triforce and draft modes (same vocabulary as model)."""
    check_config(cfg)
    check_fits(model, len(prompt_ids), cfg.max_new_tokens)
    # Room for the prompt, the new tokens and one verification block, in whole retrieval chunks.
    capacity = math.ceil((len(prompt_ids) + cfg.max_new_tokens + cfg.gamma2 + 1) / cfg.chunk_size) * cfg.chunk_size
    t0 = time.perf_counter()
    full = model.new_cache(FullCache, capacity)
    logits = prefill(model, full, torch.tensor([prompt_ids], device=full.k.device), cfg.prefill_chunk, progress)
    return decode(model, full, logits, prompt_ids, cfg, on_token, drafter, time.perf_counter() - t0)


def decode(model, full, logits, prompt_ids: list, cfg: GenerationConfig, on_token=None, drafter=None,
           prefill_s: float = 0.0) -> GenerationResult:
    """The generate loop after the target's prefill: full holds prompt_ids, logits [1, V] follow them."""
    gen = torch.Generator(device=full.k.device).manual_seed(cfg.seed)
    sp, stop = cfg.sampling, (set() if cfg.ignore_eos else eos_ids(model))
    t0 = time.perf_counter()
    tok = sample(logits, sp, gen)
    tiers = build_tiers(model, full, drafter, prompt_ids, cfg)
    prefill_s += time.perf_counter() - t0

    hierarchy, top = Hierarchy(tiers, sp, gen), len(tiers) - 1
    seq, out = list(prompt_ids), []

    def emit(new: list) -> bool:  # True once generation is over
        for t in new:
            seq.append(t)
            out.append(t)
            if on_token:
                on_token(t)
            if t in stop or len(out) == cfg.max_new_tokens:
                return True
        return False

    t0 = time.perf_counter()
    done, since_select = emit([int(tok)]), 0
    while not done:
        new, _ = hierarchy.round(top, seq, cfg.max_new_tokens - len(out))
        done = emit(new)
        since_select += len(new)
        if cfg.refresh and since_select >= cfg.refresh and not done:
            hierarchy.refresh()
            since_select = 0
    decode_s = time.perf_counter() - t0
    text = model.tokenizer.decode(out, skip_special_tokens=True) if model.tokenizer else ""
    return GenerationResult(cfg.mode, len(prompt_ids), out, text, prefill_s, decode_s, [asdict(t.stats) for t in tiers])
