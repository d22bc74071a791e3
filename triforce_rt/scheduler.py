"""Batch scheduling: many requests, up to B of them decoding together.

  continuous  a row that ends frees its slot at once: the next request's prompt is prefilled alone, one chunk of
              prefill_chunk tokens per decode round (the rows decoding wait a chunk at a time, not a whole prompt),
              and joins the batch (engine.Decoder.join);
  static      B requests at a time, prefilled together (padded to the longest), and the next B only when all of
              them have ended (the schedule of earlier versions, kept to measure against).
Requests share a batch when their settings are the same but for max_new_tokens and ignore_eos (shared());
otherwise they are scheduled one setting after the other. Every cache of a batch is sized for its longest prompt
and most new tokens, so that a prefilled row has the sizes of the batch it joins.
The target's KV is either preallocated per row (a FullCache of the longest row's slots) or, with kv_block > 0,
paged: blocks of a pool shared by the batch (retrieval_cache.PagedCache), taken as tokens arrive and given back
when a row ends, so memory follows the tokens held. The pool grows by an eighth when short, up to kv_memory_gb; a
request is admitted only when the blocks it may need (prompt, new tokens, one verification) fit beside those the
rows decoding may need, so a full pool queues the next request and never fails a row mid-way.
"""
import math
import time
from collections import deque
from dataclasses import astuple, dataclass, replace

from offload import KVStream
from retrieval_cache import BlockPool, FullCache, PagedCache

from .engine import Decoder, capacity, prefill_steps
from .errors import UserError
from .models.quant import quantized
from .settings import GenerationConfig, uses_retrieval

SCHEDULES = ("continuous", "static")


@dataclass
class Schedule:
    """How a job's requests share the model: up to `batch` decoding together, `kind` (SCHEDULES), and the target's
    KV: preallocated per row (kv_block 0) or in blocks of kv_block tokens, the pool capped at kv_memory_gb."""
    batch: int = 1
    kind: str = "continuous"
    kv_block: int = 0
    kv_memory_gb: float | None = None

    def check(self, kv_offload: bool = False) -> None:
        """These settings, as one-line errors (kv_offload: the target's KV cache lives in host memory)."""
        if self.batch < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch})")
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule '{self.kind}' (available: {', '.join(SCHEDULES)})")
        if self.kv_block < 0:
            raise UserError(f"--kv-block must be 0 (preallocated) or a block size in tokens (got {self.kv_block})")
        if self.kv_memory_gb is not None and (not self.kv_block or not self.kv_memory_gb > 0):
            raise UserError("--kv-memory needs --kv-block and a positive size in GB")
        if kv_offload and self.batch > 1:
            raise UserError("a KV cache offloaded to host memory decodes one sequence at a time (use --batch-size 1)")
        if kv_offload and self.kv_block:
            raise UserError("--kv-block cannot be combined with --offload kv: the offloaded cache is one block")


def schedule_of(args) -> Schedule:
    """The Schedule of `triforce batch`'s parsed flags."""
    return Schedule(args.batch_size, args.schedule, args.kv_block, args.kv_memory)


@dataclass
class Request:
    key: object  # the caller's name for it (a batch line's id)
    ids: list  # prompt token ids (checked against the context by the caller: engine.check_fits)
    cfg: GenerationConfig


def shared(cfg: GenerationConfig) -> GenerationConfig:
    """The settings rows of one batch must share: all but each row's own max_new_tokens and ignore_eos."""
    return replace(cfg, max_new_tokens=1, ignore_eos=False)


def check_block(cfg: GenerationConfig, block: int) -> None:
    """A retrieval tier reads whole chunks through the block table: the block must divide the chunk size. A tree
    step (beams > 1) writes scratch slots that only the preallocated cache has."""
    if block and uses_retrieval(cfg.mode) and cfg.chunk_size % block:
        raise UserError(f"--kv-block {block} must divide the retrieval chunk size ({cfg.chunk_size}) of mode "
                        f"'{cfg.mode}'")
    if block and cfg.beams > 1:
        raise UserError("--beams > 1 (tree verification) needs the preallocated KV cache: drop --kv-block")


class Prefill:
    """Requests' prompts prefilled together into a new target cache of `slots` slots per row (a FullCache, or a
    PagedCache over pool), one forward per step()."""

    def __init__(self, model, reqs: list, slots: int, chunk: int, pool: BlockPool | None = None):
        self.reqs, self.seconds, self.logits = reqs, 0.0, None
        t0 = time.perf_counter()
        if pool is not None:
            self.full = PagedCache(pool, slots, batch=len(reqs))
        else:
            store = KVStream if model.runtime.kv_offload else None
            self.full = model.new_cache(FullCache, slots, batch=len(reqs), store=store)
        self.forwards = prefill_steps(model, self.full, [r.ids for r in reqs], chunk)
        self.step_tokens = max(1, chunk // len(reqs))  # prefill_steps' split of a chunk over the rows
        self.total = math.ceil(max(len(r.ids) for r in reqs) / self.step_tokens)  # forwards in all
        self.held, self.steps = 0, 0  # prompt tokens in the cache so far; forwards run
        self.seconds = time.perf_counter() - t0

    def step(self) -> bool:
        """One forward; True once every prompt is in the cache (logits: [B, V] after each)."""
        t0 = time.perf_counter()
        self.logits = next(self.forwards)
        self.steps += 1
        self.held = sum(min(len(r.ids), self.steps * self.step_tokens) for r in self.reqs)
        if self.steps == self.total:
            self.forwards.close()
        self.seconds += time.perf_counter() - t0
        return self.steps == self.total

    def drop(self) -> None:
        if isinstance(self.full, PagedCache):
            self.full.release()


@dataclass
class KVUse:
    """The most bytes the target's KV caches reserved at once, and the most their tokens filled."""
    reserved: int = 0
    held: int = 0

    def see(self, reserved: int, held: int) -> None:
        self.reserved, self.held = max(self.reserved, reserved), max(self.held, held)


def run(model, requests: list, sched: Schedule, on_result, drafter=None) -> KVUse:
    """Generate every request; on_result(key, GenerationResult or Exception) as each one ends (an exception: that
    request failed, the others go on). Returns the target's KV use."""
    sched.check(model.runtime.kv_offload)
    groups, use = {}, KVUse()
    for r in requests:
        groups.setdefault(astuple(shared(r.cfg)), []).append(r)
    for reqs in groups.values():
        run_group(model, reqs, sched, on_result, drafter, use)
    return use


def run_group(model, reqs: list, sched: Schedule, on_result, drafter, use: KVUse) -> None:
    """Requests that share their settings, sched.batch at a time."""
    cfg = replace(reqs[0].cfg, max_new_tokens=max(r.cfg.max_new_tokens for r in reqs), ignore_eos=False)
    try:
        check_block(cfg, sched.kv_block)
        if cfg.draft_quant != "none":  # made, or refused, before any prefill
            quantized(model, cfg.draft_quant)
    except Exception as e:
        for r in reqs:
            on_result(r.key, e)
        return
    longest = max(len(r.ids) for r in reqs)
    slots = capacity([[0] * longest], [cfg])
    B, static = sched.batch, sched.kind == "static"
    c = model.config  # KV bytes of one token: k and v, every layer
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.norm.weight.element_size()
    pool = Pool(model, sched, slots, B, per_token) if sched.kv_block else None
    pending, filling = deque(reqs), None
    fresh = lambda: Decoder(model, cfg, drafter, longest=longest)  # noqa: E731
    dec = fresh()

    def report(key, res) -> None:
        if pool:
            pool.done(key)
        on_result(key, res)

    def see_kv() -> None:
        rows = len(dec.rows) + (len(filling.reqs) if filling else 0)
        held = sum(r.prompt_tokens + len(r.out) for r in dec.rows) + (filling.held if filling else 0)
        use.see(pool.blocks.bytes if pool else rows * slots * per_token, held * per_token)

    def fail(keys: list, e: Exception) -> None:
        for key in dict.fromkeys(keys):
            report(key, e)

    while pending or filling or dec.rows:
        free = B - len(dec.rows)
        if filling is None and pending and (free == B if static else free > 0):
            take = [pending[i] for i in range(min(free if static else 1, len(pending)))]
            while pool and take and not pool.admit(take):  # as many as the pool can promise blocks to
                take.pop()
            for _ in take:
                pending.popleft()
            if take:
                try:
                    filling = Prefill(model, take, slots, cfg.prefill_chunk, pool and pool.blocks)
                except Exception as e:  # out of memory for its cache: this request's error, the others go on
                    fail([r.key for r in take], e)
            elif not dec.rows:  # alone it still does not fit: its error (Pool.admit said why)
                fail([pending.popleft().key], pool.refusal)
        joining = None
        try:
            if filling is not None and filling.step():
                joining, filling = filling, None
                for key, res in dec.join(joining.full, joining.logits, [r.ids for r in joining.reqs],
                                         [r.key for r in joining.reqs], joining.seconds, [r.cfg for r in joining.reqs]):
                    report(key, res)
                joining = None
            if dec.rows:
                see_kv()  # (before the round: rows about to end still hold their tokens)
                for key, res in dec.round():
                    report(key, res)
        except Exception as e:  # a failure while decoding (out of memory, a bug) costs the requests in flight only
            fail([row.key for row in dec.rows] + [r.key for x in (joining, filling) if x for r in x.reqs], e)
            for x in (joining, filling):
                if x:
                    x.drop()
            if dec.h is not None:
                dec.h.pool[-1].cache.keep([])  # a paged cache's blocks back to the pool
            dec, filling = fresh(), None
        see_kv()


class Pool:
    """The block pool of one batch and its admission rule: a request is admitted when the blocks it may need fit
    beside those promised to the requests in flight, within the pool's cap."""

    def __init__(self, model, sched: Schedule, slots: int, batch: int, per_token: int):
        most = math.ceil(slots / sched.kv_block) * batch  # every row at the longest: never short
        cap = most if sched.kv_memory_gb is None else int(sched.kv_memory_gb * 2**30 // (per_token * sched.kv_block))
        self.blocks = model.new_cache(BlockPool, sched.kv_block, 1, limit=cap)
        self.promised, self.refusal = {}, None

    def need(self, r: Request) -> int:
        return self.blocks.blocks_for(len(r.ids) + r.cfg.max_new_tokens + r.cfg.gamma2 + 1)

    def admit(self, reqs: list) -> bool:
        need = sum(map(self.need, reqs))
        if sum(self.promised.values()) + need > self.blocks.limit:
            self.refusal = UserError(f"needs {need} KV blocks of {self.blocks.block} tokens; the pool holds "
                                     f"{self.blocks.limit} (raise --kv-memory)")
            return False
        self.promised.update({r.key: self.need(r) for r in reqs})
        return True

    def done(self, key) -> None:
        self.promised.pop(key, None)
