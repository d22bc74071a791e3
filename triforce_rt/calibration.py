"""Step costs of the tiers `--mode auto` chooses among, measured on this machine and cached.

One calibration times, over the session's own prefilled caches, the target's forward of T tokens per row
(T = 1, 2, 4 and γ_max + 1: the verifications), one step of the retrieval tier, and one re-selection of the
retrieval cache; each the median of REPEATS runs. The forwards write cache slots past each row's committed tokens,
which no query sees until real tokens overwrite them (caches are addressed by position); the target's last query
and the retrieval selection are restored afterwards.
Results are cached in $TRIFORCE_CACHE/calibration.json per machine (CPU or GPU name, threads), model (its folder,
kernels, attention kernel, dtype, device, drafting copy), batch size, retrieval budget and context bucket (the
prompt length rounded up to a power of two), so later runs pay nothing.
"""
import json
import logging
import os
import platform
import statistics
import time
from copy import copy

import numpy as np
import torch

import cpu_kernels
from retrieval_cache import cpu_attention
from retrieval_cache import kernel as attention_kernel

from .models.loader import cache_root

REPEATS = 3
log = logging.getLogger(__name__)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def key(model, draft, batch: int, budget: int, context: int, gamma_max: int) -> str:
    m = machine()
    bucket = 1 << max(0, context - 1).bit_length()
    return json.dumps([m.get("gpu") if model.device.type == "cuda" else m["cpu"], m["threads"], model.source,
                       f"{model.runtime.kernels}:{cpu_kernels.VERSION}",
                       f"{attention_kernel()}:{cpu_attention.VERSION}",
                       str(model.norm.weight.dtype), str(model.device),
                       draft.runtime.kernels + ":" + str(draft.weight_bytes()), batch, budget, bucket, gamma_max])


def path() -> str:
    return os.path.join(cache_root(), "calibration.json")


def load(k: str) -> dict | None:
    try:
        with open(path(), encoding="utf-8") as f:
            return json.load(f).get(k)
    except (OSError, ValueError):
        return None


def save(k: str, costs: dict) -> None:
    """Add costs under k to the cache file (atomically; a cache that cannot be written is skipped)."""
    try:
        os.makedirs(cache_root(), exist_ok=True)
        try:
            with open(path(), encoding="utf-8") as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table[k] = costs
        tmp = f"{path()}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(table, f)
        os.replace(tmp, path())
    except OSError:
        pass


def timed(tier, rows: list, T: int, need: int) -> float:
    """Seconds of tier's forward of T tokens per row after each row's committed tokens (tier.pos kept)."""
    from .speculation import Tokens

    pos = list(tier.pos)
    filler = Tokens([list(r) + [int(r[-1])] * T for r in rows], max(map(len, rows)) + T)
    for b, p in enumerate(pos):
        filler.n[b] = p + T
    t0 = time.perf_counter()
    logits = tier.feed(filler, [need] * len(rows))
    if logits.is_cuda:  # the forward is queued, not done, until the device catches up
        torch.cuda.synchronize(logits.device)
    tier.pos = pos
    return time.perf_counter() - t0


def measure(target, retrieval, rows: list, gamma_max: int) -> dict:
    """{"target": {T: s}, "retrieval": s, "select": s} over the tiers' current caches; rows: each row's committed
    tokens (target.pos[b] of them in its cache). Stats, the target's last query and the selection are restored."""
    full = target.cache
    last_q, stats = full.last_q.clone(), (copy(target.stats), copy(retrieval.stats))
    median = lambda f: statistics.median(f() for _ in range(REPEATS))
    costs = {"target": {T: median(lambda: timed(target, rows, T, T)) for T in sorted({1, 2, 4, gamma_max + 1})},
             "retrieval": median(lambda: timed(retrieval, rows, 1, 1))}
    full.last_q = last_q

    def select():
        t0 = time.perf_counter()
        retrieval.cache.select(full, list(target.pos))
        if retrieval.cache.k.is_cuda:
            torch.cuda.synchronize(retrieval.cache.k.device)
        return time.perf_counter() - t0

    costs["select"] = median(select)
    retrieval.pos = list(target.pos)
    target.stats, retrieval.stats = stats
    return costs


def costs_for(target, retrieval, rows: list, gamma_max: int, budget: int) -> dict:
    """The cached costs for this setting, or a fresh measurement (then cached); logged at INFO (--verbose)."""
    model = target.model
    k = key(model, retrieval.model, len(rows), budget, max(map(len, rows)), gamma_max)
    costs = from_rank0(model, load(k) if model.source else None)  # a model built in memory has no name to cache it
    if costs is None:  # every rank measures (the forwards are collective) and takes rank 0's figures
        costs = from_rank0(model, measure(target, retrieval, rows, gamma_max))
        if model.source:
            save(k, costs)
        how = "measured"
    else:
        costs["target"] = {int(t): s for t, s in costs["target"].items()}
        how = f"cached in {path()}"
    t = ", ".join(f"T={T} {1000 * s:.1f} ms" for T, s in costs["target"].items())
    log.info(f"[auto] step costs ({how}): target {t}; retrieval step {1000 * costs['retrieval']:.1f} ms; "
             f"re-selection {1000 * costs['select']:.1f} ms")
    return costs


def from_rank0(model, obj):
    """obj as rank 0 holds it, on every rank of a tensor-parallel model (--tp: the ranks run the same forwards and
    must make the same choices, so they share one set of costs); obj itself otherwise."""
    if not model.runtime.tensor_parallel:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def interpolate(points: dict, T: int) -> float:
    """Cost of a T-token forward from the measured {T: s}, linear between the points (T is within them)."""
    ts = sorted(points)
    return float(np.interp(T, ts, [points[t] for t in ts]))
