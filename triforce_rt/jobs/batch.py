"""`triforce batch`: one generation per JSONL input line, appended durably to the output (jsonl.py).

Input line: {"id": str, "prompt": str | "messages": [{"role", "content"}...], and optionally the settings that
settings.py marks for lines: "max_new_tokens", "ignore_eos", "seed", "temperature", "top_p", "top_k"}, each checked
as the flags are; any other key is an error. Output line: {"id", "text", "tokens", "prompt_tokens", "new_tokens",
"tiers", ...} (the generate --json fields), or {"id", "error"} for a line that cannot run; a line that is not JSON,
has no usable id or repeats an id gets the id "line:N". Ids already generated in the output are skipped, so a killed
job restarted with the same --out ends with every input id exactly once; a line whose record is an error runs again
(its error record is dropped first), so fixing a line and re-running gives its record. `triforce batch` exits 1
when a line of this run ends as an error record, so scripts notice.
With --batch-size B > 1, up to B lines that share their generation settings (but for max_new_tokens and
ignore_eos) decode together, one forward per tier step for the batch (scheduler.py): by default a line that ends
frees its slot for the next one at once (--schedule continuous); --schedule static takes B lines at a time;
--kv-block N pages the target's KV cache (--kv-memory caps it). Each record is appended as its line ends, so
records come in the order lines end.
"""
import json
import sys
import time
from dataclasses import replace

from .. import scheduler
from ..engine import check_fits
from ..errors import UserError, first_line
from ..jsonl import append_record, drop_records, read_records
from ..settings import SETTINGS, check_config, check_setting
from ..textio import LogBar, chat_ids, encode

LINE_SETTINGS = [name for name, m in SETTINGS.items() if m["line"]]  # the settings an input line may give
LINE_KEYS = ("id", "prompt", "messages", *LINE_SETTINGS)


def parse_line(n: int, line: bytes, seen: set) -> tuple:
    """(id, request dict or None, error or None) of input line n (1-based); the id is None where the line has no
    usable one of its own (line_ids() names it)."""
    try:
        req = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return None, None, f"not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        return None, None, f"not JSON ({e.msg} at column {e.colno})"
    if not isinstance(req, dict):
        return None, None, "expected a JSON object"
    rid = req.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        return None, None, "missing or invalid 'id' (a string)"
    rid = str(rid)
    if rid in seen:
        return None, None, f"duplicate id '{rid}'"
    seen.add(rid)
    return rid, req, None


def line_ids(parsed: list, seen: set) -> list:
    """parsed [(n, id or None, ...)]: each line without an id of its own gets 'line:N', or 'line:N.K' where an input
    id already spells that, so the ids of the records stay unique."""
    out = []
    for n, rid, *rest in parsed:
        if rid is None:
            rid, k = f"line:{n}", 1
            while rid in seen:
                rid, k = f"line:{n}.{k}", k + 1
            seen.add(rid)
        out.append((n, rid, *rest))
    return out


def request_ids(model, req: dict, chat: bool) -> list:
    if "messages" in req:
        msgs = req["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise UserError("'messages' must be a non-empty list of {role, content} objects with string values")
        return chat_ids(model.tokenizer, msgs)
    if not isinstance(req.get("prompt"), str):
        raise UserError("missing 'prompt' (a string) or 'messages'")
    return encode(model.tokenizer, req["prompt"], chat)


def request_config(cfg, req: dict):
    unknown = [k for k in req if k not in LINE_KEYS]
    if unknown:  # a misspelt setting ("max_tokens") would otherwise run with the default
        raise UserError(f"unknown key '{unknown[0]}' (a line may have: {', '.join(LINE_KEYS)})")
    out = replace(cfg, **{k: check_setting(k, req[k]) for k in LINE_SETTINGS if k in req})
    check_config(out)
    return out


def line_error(e: Exception) -> str:
    """The error record's text: a UserError's message, any other exception with its type, on one line."""
    return first_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)}"


def prepare(model, cfg, chat: bool, rid: str, req, err) -> tuple:
    """(id, prompt ids, config, error) of one input line: ids and config, or an error message."""
    try:
        if err is not None:
            raise UserError(err)
        rcfg = request_config(cfg, req)
        ids = request_ids(model, req, chat)
        check_fits(model, len(ids), rcfg)
        return rid, ids, rcfg, None
    except Exception as e:  # whatever a line holds (a chat template can raise anything): its own error record
        return rid, None, None, line_error(e)


def finished(out_path: str) -> dict:
    """{id: whether its record is an error} of the records already in out_path (checked before the model loads:
    a file this tool did not write is refused, untouched)."""
    try:
        return {str(r["id"]): "error" in r for r in read_records(out_path, "id")}
    except ValueError as e:
        raise UserError(f"cannot resume from {out_path}: {e}") from None


def pending(input_path: str, out_path: str, done: dict) -> tuple:
    """(lines, items, counts): the input's non-blank lines; (id, request or None, error or None) of each line to
    run (not in out_path yet, or there as an error record, which is dropped now); counts {done, errors, skipped,
    retried} with the skipped lines and the retried error records."""
    with open(input_path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    seen = set()
    parsed = line_ids([(n, *parse_line(n, line, seen)) for n, line in lines], seen)
    retry = {rid for _, rid, _, _ in parsed if done.get(rid)}
    if retry:
        drop_records(out_path, "id", retry)
    items = [(rid, req, err) for _, rid, req, err in parsed if rid not in done or rid in retry]
    return lines, items, {"done": 0, "errors": 0, "skipped": len(lines) - len(items), "retried": len(retry)}


def record(rid: str, res) -> dict:
    """A line's output record: its GenerationResult's fields, or {"id", "error"} for an error (a message or an
    exception)."""
    if isinstance(res, (str, Exception)):
        return {"id": rid, "error": res if isinstance(res, str) else line_error(res)}
    return {"id": rid, **res.to_json()}


class Output:
    """The job's output file: write(id, result) appends a line's record (a GenerationResult, or an error: a message
    or an exception) durably, counts it and moves the progress bar."""

    def __init__(self, out_path: str, lines: int, counts: dict, progress: bool):
        self.path, self.counts, self.new_tokens, self.t0 = out_path, counts, 0, time.perf_counter()
        self.file = open(out_path, "a", encoding="utf-8")
        self.bar = LogBar(total=lines, initial=counts["skipped"], desc="batch", unit="rec", disable=not progress)

    def write(self, rid: str, res) -> None:
        rec = res if isinstance(res, dict) else record(rid, res)  # a dict: a record a Ray worker made
        self.counts["errors" if "error" in rec else "done"] += 1
        self.new_tokens += rec.get("new_tokens", 0)
        append_record(self.file, rec)
        self.bar.set_postfix(tok_s=f"{self.new_tokens / (time.perf_counter() - self.t0):.1f}")
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.file.close()
        c = self.counts
        retried = f" ({c['retried']} error records run again)" if c["retried"] else ""
        print(f"batch: {c['done']} generated, {c['errors']} errors, {c['skipped']} already in {self.path}{retried}",
              file=sys.stderr)


def generate_lines(model, drafter, cfg, chat: bool, items: list, sched: scheduler.Schedule, write) -> None:
    """Each item's result through write(id, result): its error (a line that cannot run: at once), else its
    GenerationResult as its line ends, scheduled by sched (scheduler.py)."""
    requests = []
    for rid, ids, rcfg, err in (prepare(model, cfg, chat, *item) for item in items):
        if err is not None:
            write(rid, err)
        else:
            requests.append(scheduler.Request(rid, ids, rcfg))
    scheduler.run(model, requests, sched, write, drafter)


def run_batch(model, drafter, input_path: str, out_path: str, cfg, chat: bool, progress: bool,
              sched: scheduler.Schedule | None = None, done: dict | None = None) -> dict:
    """Process every input line not yet in out_path (done: finished(out_path), if already read), scheduled by
    sched (scheduler.py; default: one line at a time). A line whose record there is an error runs again:
    its old record is dropped first, so the output keeps one record per id. Returns counts {done, errors, skipped,
    retried}: generated and error records written now, lines already generated, and error records run again."""
    sched = sched or scheduler.Schedule()
    sched.check(model.runtime.kv_offload)
    lines, items, counts = pending(input_path, out_path, finished(out_path) if done is None else done)
    with Output(out_path, len(lines), counts, progress) as out:
        generate_lines(model, drafter, cfg, chat, items, sched, out.write)
    return counts
