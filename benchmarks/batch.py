"""Batched decoding.

    python benchmarks/batch.py [TAG] [--batch 4] [--contexts 4096 8064] [--prompt summarize|explain] [--refresh N]
(issue #7) B sequences decoded together against the same B prompts one at a time, for ar, self-spec,
streaming-spec and triforce (the shipped drafter), on SmolLM2-135M fp32, 2 threads, 64 greedy tokens; writes
benchmarks/results/batch-TAG.{json,md} (TAG defaults to cpu).

    python benchmarks/batch.py mixed [--requests 32] [--shortest 512] [--longest 8064]
        [--rows ar:4:static ar:4:continuous ...] [--ray-requests 8]
(issue #33) the batch scheduler over a mixed workload: requests about held-out documents, prompt lengths spread
evenly from --shortest to --longest tokens in a shuffled order, 64 greedy new tokens each, on the default model.
Each row (mode:B:schedule[:kv block]) runs the whole workload: static groups against continuous batching, with
the target's KV preallocated or paged (throughput = all new tokens / the job's wall time, prefill included, since
a job's user waits for both); the most KV bytes reserved at once against the most the tokens filled; then
`triforce batch --workers 1` against 2 (a local Ray cluster started by the command; its wall time).
Writes benchmarks/results/batch-mixed-TAG.{json,md}. One run, ratios within it.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

from drivers import PROMPTS, batch_markdown, heldout_ids, result_path, run_batch, script_args, write_markdown
from triforce_rt.engine import GenerationConfig
from triforce_rt import scheduler
from triforce_rt.jobs.batch import prepare, record
from triforce_rt.jsonl import read_records
from triforce_rt.measure import machine, publish
from triforce_rt.models import load_model
from triforce_rt.models.loader import default_drafter
from triforce_rt.scheduler import Request, Schedule


def mixed_lines(tokenizer, n: int, shortest: int, longest: int, new_tokens: int) -> list:
    """n batch input lines (chat messages) asking to summarize held-out documents of shortest..longest tokens."""
    instruction, source = PROMPTS["summarize"]
    doc = heldout_ids(tokenizer, longest + 64 * n, source)
    lengths = [round(shortest + (longest - shortest) * i / max(1, n - 1)) for i in range(n)]
    random.Random(0).shuffle(lengths)
    lines = []
    for i, length in enumerate(lengths):
        text = tokenizer.decode(doc[64 * i : 64 * i + length - 40])  # the chat template adds about 30 tokens
        lines.append({"id": f"q{i:02d}", "messages": [{"role": "user", "content": instruction + text}],
                      "max_new_tokens": new_tokens})
    return lines


def job(model, lines: list, cfg, sched: Schedule) -> tuple:
    """(wall seconds, records, KVUse) of the scheduler over the lines (prepared as `triforce batch` does)."""
    requests = [Request(rid, ids, rcfg) for rid, ids, rcfg, _ in
                (prepare(model, cfg, False, line["id"], line, None) for line in lines)]
    got = {}
    t0 = time.perf_counter()
    use = scheduler.run(model, requests, sched, lambda key, res: got.setdefault(key, res))
    wall = time.perf_counter() - t0
    return wall, [record(key, res) for key, res in got.items()], use


def ray_job(path: str, workers: int, batch: int, threads: int) -> tuple:
    """(wall seconds of the CLI command, records) of `triforce batch --workers N` over path, a new local cluster."""
    import subprocess

    out = tempfile.mktemp(suffix=".jsonl")
    cmd = [sys.executable, "-m", "triforce_rt", "batch", path, "--out", out, "--mode", "ar", "--ignore-eos",
           "--batch-size", str(batch), "--workers", str(workers), "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = read_records(out)
    os.remove(out)
    return wall, records


def run_mixed(args) -> dict:
    torch.set_num_threads(args.threads)
    model = load_model("default")
    lines = mixed_lines(model.tokenizer, args.requests, args.shortest, args.longest, args.new_tokens)
    report = {"benchmark": "batch-mixed", "model": "default", "kernels": model.runtime.kernels,
              "requests": args.requests, "shortest": args.shortest, "longest": args.longest,
              "new_tokens": args.new_tokens, "machine": machine(), "rows": [], "ray": []}
    job(model, lines[:2], GenerationConfig(mode="auto", max_new_tokens=2), Schedule(2))  # warm-up
    reference, static = None, {}
    for spec in args.rows:
        mode, B, kind, *block = spec.split(":")
        sched = Schedule(int(B), kind, int(block[0]) if block else 0)
        cfg = GenerationConfig(mode=mode, max_new_tokens=args.new_tokens, ignore_eos=True)
        wall, records, use = job(model, lines, cfg, sched)
        tokens = {r["id"]: r.get("tokens") for r in records}
        reference = reference or tokens
        static.setdefault((mode, B), wall) if kind == "static" else None
        row = {"mode": mode, "batch": sched.batch, "schedule": kind, "kv_block": sched.kv_block,
               "wall_s": round(wall, 1), "new_tok_s": round(sum(r.get("new_tokens", 0) for r in records) / wall, 2),
               "requests_per_min": round(60 * len(records) / wall, 2),
               "vs_static": round(static[mode, B] / wall, 2) if (mode, B) in static else None,
               "errors": sum("error" in r for r in records), "tokens_identical": tokens == reference,
               "prefill_s": round(sum(r.get("prefill_seconds", 0) for r in records), 1),
               "kv_reserved_mb": round(use.reserved / 1e6), "kv_held_mb": round(use.held / 1e6),
               "kv_reserved_vs_held": round(use.reserved / use.held, 2),
               "plans": sorted({p["mode"] for r in records for p in r.get("plan", [])})}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    ray_path = tempfile.mktemp(suffix=".jsonl")
    with open(ray_path, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines[: args.ray_requests])
    for workers in (1, 2) if args.ray_requests else ():
        wall, records = ray_job(ray_path, workers, 4, max(1, args.threads // workers))
        row = {"workers": workers, "requests": len(records), "wall_s": round(wall, 1),
               "new_tok_s": round(sum(r["new_tokens"] for r in records) / wall, 2),
               "ids_once": sorted(r["id"] for r in records) == sorted(line["id"] for line in lines[: args.ray_requests]),
               "tokens_identical": all(r["tokens"] == reference[r["id"]] for r in records)}
        report["ray"].append(row)
        print(json.dumps(row), flush=True)
    os.remove(ray_path)
    return report


def mixed_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"`triforce batch` over {report['requests']} requests (summarize a held-out document; prompts of "
             f"{report['shortest']}..{report['longest']} tokens, spread evenly, shuffled), {report['new_tokens']} "
             f"greedy new tokens each (ignore_eos), default model ({report['kernels']} kernels), {m['cpu']}, "
             f"{m['threads']} threads, torch {m['torch']}. Throughput = all new tokens / the job's wall time, "
             "prefill included. KV: the most bytes the target's caches reserved at once (preallocated: every row "
             "sized for the longest prompt; paged: the block pool) and the most their tokens filled; identical: "
             "every request's tokens equal the first row's.", "",
             "| mode | B | schedule | KV block | wall s | new tok/s | requests/min | vs static | identical | errors "
             "| KV reserved MB | KV held MB | reserved vs held | plans |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        vs = f"{r['vs_static']}x" if r["vs_static"] else ""
        lines.append(f"| {r['mode']} | {r['batch']} | {r['schedule']} | {r['kv_block'] or 'preallocated'} "
                     f"| {r['wall_s']} | {r['new_tok_s']} | {r['requests_per_min']} | {vs} | {r['tokens_identical']} "
                     f"| {r['errors']} | {r['kv_reserved_mb']} | {r['kv_held_mb']} | {r['kv_reserved_vs_held']}x "
                     f"| {', '.join(r['plans'])} |")
    if not report["ray"]:
        return "\n".join(lines)
    lines += ["", f"Ray: the first {report['ray'][0]['requests'] if report['ray'] else 0} requests, ar, B = 4, "
                  "continuous, `triforce batch --workers N` on a local cluster started by the command (wall time of "
                  "the whole command: cluster start, N model loads, the job), threads split between the workers.", "",
              "| workers | wall s | new tok/s | every id once | identical |", "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['wall_s']} | {r['new_tok_s']} | {r['ids_once']} | {r['tokens_identical']} |"
              for r in report["ray"]]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mixed"]:
        ap = script_args(argparse.ArgumentParser())
        ap.add_argument("--requests", type=int, default=32)
        ap.add_argument("--shortest", type=int, default=512)
        ap.add_argument("--longest", type=int, default=8064)
        ap.add_argument("--new-tokens", type=int, default=64)
        ap.add_argument("--rows", nargs="+", default=["ar:4:static", "ar:4:continuous", "ar:8:static",
                                                      "ar:8:continuous", "ar:8:continuous:8", "auto:8:static",
                                                      "auto:8:continuous"], help="mode:B:schedule[:kv block]")
        ap.add_argument("--ray-requests", type=int, default=8)
        ap.add_argument("--threads", type=int, default=2)
        args = ap.parse_args(sys.argv[2:])
        path = result_path("batch-mixed", args.tag)
        report = run_mixed(args)
        publish(report, mixed_markdown, path)
        write_markdown(path, ap, args, "batch mixed", mixed_markdown(report))
        sys.exit(0)
    ap = script_args(argparse.ArgumentParser())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8064])
    ap.add_argument("--prompt", choices=sorted(PROMPTS), default="summarize")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--refresh", type=int, default=GenerationConfig.refresh, help="retrieval refresh")
    args = ap.parse_args()
    path = result_path("batch", args.tag)
    report = run_batch("default", tuple(args.contexts), args.batch, args.new_tokens, 2, drafter=default_drafter(),
                       prompt=args.prompt, out=path, refresh=args.refresh)
    write_markdown(path, ap, args, "batch", batch_markdown(report))
