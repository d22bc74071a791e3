"""`triforce batch`: one generation per JSONL input line, appended durably to the output (jsonl.py).

Input line: {"id": str, "prompt": str | "messages": [{"role", "content"}...], optional "max_new_tokens",
"temperature", "top_p", "top_k", "seed", "ignore_eos"}. Output line: {"id", "text", "tokens", "prompt_tokens",
"new_tokens", "tiers", ...} (the generate --json fields), or {"id", "error"} for a line that cannot run; a line
that is not JSON, has no usable id or repeats an id gets the id "line:N". Ids already in the output are skipped,
so a killed job restarted with the same --out ends with every input id exactly once.
"""
import json
import sys
import time
from dataclasses import replace

from tqdm import tqdm

from ..engine import check_config, generate
from ..errors import UserError
from ..jsonl import append_record, read_records
from ..textio import chat_ids, encode

OVERRIDES = {"max_new_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int, "seed": int,
             "ignore_eos": bool}


def parse_line(n: int, line: str, seen: set) -> tuple:
    """(id, request dict or None, error or None) of input line n (1-based)."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        return f"line:{n}", None, f"not JSON ({e.msg} at column {e.colno})"
    if not isinstance(req, dict):
        return f"line:{n}", None, "expected a JSON object"
    rid = req.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        return f"line:{n}", None, "missing or invalid 'id' (a string)"
    rid = str(rid)
    if rid in seen:
        return f"line:{n}", None, f"duplicate id '{rid}'"
    seen.add(rid)
    return rid, req, None


def request_ids(model, req: dict, chat: bool) -> list:
    if "messages" in req:
        msgs = req["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise UserError("'messages' must be a list of {role, content} objects")
        return chat_ids(model.tokenizer, msgs)
    if not isinstance(req.get("prompt"), str):
        raise UserError("missing 'prompt' (a string) or 'messages'")
    return encode(model.tokenizer, req["prompt"], chat)


def request_config(cfg, req: dict):
    kw = {}
    for k, t in OVERRIDES.items():
        if k in req:
            if not isinstance(req[k], t) or (t is int and isinstance(req[k], bool)):
                raise UserError(f"'{k}' has the wrong type ({type(req[k]).__name__})")
            kw[k] = req[k]
    out = replace(cfg, **kw)
    check_config(out)
    return out


def run_batch(model, drafter, input_path: str, out_path: str, cfg, chat: bool, progress: bool) -> dict:
    """Process every input line not yet in out_path; returns counts {done, skipped, errors}."""
    try:
        done = {str(r["id"]) for r in read_records(out_path)}
    except (ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {out_path}: {e}") from None
    with open(input_path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    seen, todo = set(), []
    for n, line in lines:
        rid, req, err = parse_line(n, line, seen)
        if rid not in done:
            todo.append((rid, req, err))
    counts = {"done": 0, "skipped": len(lines) - len(todo), "errors": 0}
    new_tokens, t0 = 0, time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as out, \
            tqdm(total=len(lines), initial=counts["skipped"], desc="batch", unit="rec", disable=not progress) as bar:
        for rid, req, err in todo:
            record = {"id": rid, "error": err}
            if err is None:
                try:
                    rcfg = request_config(cfg, req)
                    ids = request_ids(model, req, chat)
                    res = generate(model, ids, rcfg, drafter=drafter)
                    record = {"id": rid, **res.to_json()}
                    new_tokens += res.new_tokens
                except UserError as e:
                    record = {"id": rid, "error": str(e)}
            counts["errors" if "error" in record else "done"] += 1
            append_record(out, record)
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    print(f"batch: {counts['done']} generated, {counts['errors']} errors, {counts['skipped']} already in {out_path}",
          file=sys.stderr)
    return counts
