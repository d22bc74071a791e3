"""Batch scheduling: many requests, up to B of them decoding together.

  continuous  a row that ends frees its slot at once: the next request's prompt is prefilled alone, one chunk of
              prefill_chunk tokens per decode round (the rows decoding wait a chunk at a time, not a whole prompt),
              and joins the batch (engine.Decoder.join);
  static      B requests at a time, prefilled together (padded to the longest), and the next B only when all of
              them have ended (the schedule of earlier versions, kept to measure against).
Requests share a batch when their settings are the same but for max_new_tokens and ignore_eos (shared());
otherwise they are scheduled one setting after the other. Every cache of a batch is sized for its longest prompt
and most new tokens, so that a prefilled row has the sizes of the batch it joins.
"""
import math
import time
from collections import deque
from dataclasses import astuple, dataclass, replace

from offload import KVStream
from retrieval_cache import FullCache

from .engine import Decoder, capacity, prefill_steps
from .errors import UserError
from .models.quant import quantized
from .settings import GenerationConfig

SCHEDULES = ("continuous", "static")


@dataclass
class Request:
    key: object  # the caller's name for it (a batch line's id)
    ids: list  # prompt token ids (checked against the context by the caller: engine.check_fits)
    cfg: GenerationConfig


def shared(cfg: GenerationConfig) -> GenerationConfig:
    """The settings rows of one batch must share: all but each row's own max_new_tokens and ignore_eos."""
    return replace(cfg, max_new_tokens=1, ignore_eos=False)


class Prefill:
    """Requests' prompts prefilled together into a new FullCache of `slots` slots, one forward per step()."""

    def __init__(self, model, reqs: list, slots: int, chunk: int):
        self.reqs, self.seconds, self.logits = reqs, 0.0, None
        store = KVStream if model.runtime.kv_offload else None
        t0 = time.perf_counter()
        self.full = model.new_cache(FullCache, slots, batch=len(reqs), store=store)
        self.forwards = prefill_steps(model, self.full, [r.ids for r in reqs], chunk)
        self.left = math.ceil(max(len(r.ids) for r in reqs) / max(1, chunk // len(reqs)))
        self.seconds = time.perf_counter() - t0

    def step(self) -> bool:
        """One forward; True once every prompt is in the cache (logits: [B, V] after each)."""
        t0 = time.perf_counter()
        self.logits = next(self.forwards)
        self.left -= 1
        if not self.left:
            self.forwards.close()
        self.seconds += time.perf_counter() - t0
        return not self.left


def check(model, batch_size: int, schedule: str) -> None:
    """The scheduling settings, as one-line errors (model: the target; its KV offload decodes one row)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{schedule}' (available: {', '.join(SCHEDULES)})")
    if model.runtime.kv_offload and batch_size > 1:
        raise UserError("a KV cache offloaded to host memory decodes one sequence at a time (use --batch-size 1)")


def run(model, requests: list, batch_size: int, on_result, drafter=None, schedule: str = "continuous") -> None:
    """Generate every request; on_result(key, GenerationResult or Exception) as each one ends (an exception: that
    request failed, the others go on)."""
    check(model, batch_size, schedule)
    groups = {}
    for r in requests:
        groups.setdefault(astuple(shared(r.cfg)), []).append(r)
    for reqs in groups.values():
        run_group(model, reqs, batch_size, on_result, drafter, schedule)


def run_group(model, reqs: list, B: int, on_result, drafter, schedule: str) -> None:
    """Requests that share their settings, B at a time."""
    cfg = replace(reqs[0].cfg, max_new_tokens=max(r.cfg.max_new_tokens for r in reqs), ignore_eos=False)
    try:
        if cfg.draft_quant != "none":  # made, or refused, before any prefill
            quantized(model, cfg.draft_quant)
    except Exception as e:
        for r in reqs:
            on_result(r.key, e)
        return
    longest = max(len(r.ids) for r in reqs)
    slots = capacity([[0] * longest], [cfg])
    pending, filling = deque(reqs), None
    fresh = lambda: Decoder(model, cfg, drafter, longest=longest)  # noqa: E731
    dec = fresh()

    def fail(keys: list, e: Exception) -> None:
        for key in dict.fromkeys(keys):
            on_result(key, e)

    while pending or filling or dec.rows:
        free = B - len(dec.rows)
        if filling is None and pending and (free == B if schedule == "static" else free > 0):
            take = [pending.popleft() for _ in range(min(free if schedule == "static" else 1, len(pending)))]
            try:
                filling = Prefill(model, take, slots, cfg.prefill_chunk)
            except Exception as e:  # out of memory for its cache: this request's error, the others go on
                fail([r.key for r in take], e)
        joining = None
        try:
            if filling is not None and filling.step():
                joining, filling = filling, None
                for key, res in dec.join(joining.full, joining.logits, [r.ids for r in joining.reqs],
                                         [r.key for r in joining.reqs], joining.seconds, [r.cfg for r in joining.reqs]):
                    on_result(key, res)
                joining = None
            if dec.rows:
                for key, res in dec.round():
                    on_result(key, res)
        except Exception as e:  # a failure while decoding (out of memory, a bug) costs the requests in flight only
            fail([row.key for row in dec.rows] + [r.key for x in (joining, filling) if x for r in x.reqs], e)
            dec, filling = fresh(), None
