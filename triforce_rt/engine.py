"""Prefill and the generate loop. The autoregressive mode is one tier: the target with its FullCache.

generate() returns tokens, text and per-tier stats; on_token(id) streams each token as it is chosen.
"""
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from retrieval_cache import FullCache

from .errors import UserError
from .sampling import SamplingParams, sample

MODES = ("ar",)


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

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k)


@dataclass
class TierStats:
    name: str
    drafted: int = 0
    accepted: int = 0
    calls: int = 0
    seconds: float = 0.0


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

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(new_tokens=self.new_tokens, decode_tokens_per_second=self.decode_tokens_per_second)
        return d


def check_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.context_limit
    if prompt_len == 0:
        raise UserError("the prompt is empty")
    if prompt_len + max_new_tokens > limit:
        why = " (its sliding window, which this runtime does not apply)" if limit < model.config.max_position_embeddings else ""
        raise UserError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                        f"context of {limit} tokens{why}")


def prefill(model, cache, ids: torch.Tensor, chunk: int, progress: bool = False) -> torch.Tensor:
    """Run ids [B, L] through model into cache in chunks of `chunk` tokens; returns last logits [B, V]."""
    L = ids.shape[1]
    start = cache.length
    with tqdm(total=L, desc="prefill", unit="tok", disable=not progress, leave=False) as bar:
        for s in range(0, L, chunk):
            part = ids[:, s : s + chunk]
            pos = torch.arange(start + s, start + s + part.shape[1], device=ids.device).expand(ids.shape[0], -1)
            logits = model(part, pos, cache, last_only=True)
            bar.update(part.shape[1])
    return logits[:, -1]


def eos_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(model.tokenizer.eos_token_id)
    return ids


def generate(model, prompt_ids: list, cfg: GenerationConfig, on_token=None, progress: bool = False) -> GenerationResult:
    """Decode up to cfg.max_new_tokens after prompt_ids (batch 1). progress: a prefill bar on stderr."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown mode '{cfg.mode}' (available: {', '.join(MODES)})")
    if cfg.max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    check_fits(model, len(prompt_ids), cfg.max_new_tokens)
    device = model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sp, stop = cfg.sampling, (set() if cfg.ignore_eos else eos_ids(model))
    ids = torch.tensor([prompt_ids], device=device)
    cache = model.new_cache(FullCache, len(prompt_ids) + cfg.max_new_tokens)

    t0 = time.perf_counter()
    logits = prefill(model, cache, ids, cfg.prefill_chunk, progress)
    tok = sample(logits, sp, gen)
    prefill_s = time.perf_counter() - t0

    target = TierStats("target")
    out = []
    t0 = time.perf_counter()
    while True:
        t = int(tok)
        out.append(t)
        if on_token:
            on_token(t)
        if t in stop or len(out) == cfg.max_new_tokens:
            break
        pos = torch.tensor([[cache.length]], device=device)
        logits = model(tok.view(1, 1), pos, cache)[:, -1]
        target.calls += 1
        tok = sample(logits, sp, gen)
    decode_s = time.perf_counter() - t0
    target.seconds = decode_s
    text = model.tokenizer.decode(out, skip_special_tokens=True) if model.tokenizer else ""
    return GenerationResult(cfg.mode, len(prompt_ids), out, text, prefill_s, decode_s, [asdict(target)])
